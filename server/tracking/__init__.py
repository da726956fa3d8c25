"""Comparing runs and tracking them: what happens with runs beside the round loop.

* :mod:`server.tracking.compare` — ``fedpriv compare``: the table and the page of runs;
* :mod:`server.tracking.runs` — reading run directories, finding what their configs differ in;
* :mod:`server.tracking.page` — its self-contained HTML page (privacy–utility curve);
* :mod:`server.tracking.tracker` — ``tracking=mlflow``: one MLflow run per run, fed by the
  round loop's observer (``server.round.loop.RoundObserver``), continued on resume;
* :mod:`server.tracking.sweep` — a ``-m`` sweep's parent run and its comparison page;
* :mod:`server.tracking.mlflow_client` — the calls to MLflow's client (``fedpriv[mlflow]``).

The round loop imports none of it: a runtime (``server.runtime.serve.federate``) builds the
observer from the config and hands it to the loop.
"""
