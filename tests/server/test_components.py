"""server/runtime/pinning.py: the ClientApp reference and fedpriv's packages pinned to their folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle

from server.runtime.pinning import CLIENT_APP, ROOT, ClientAppRef, load
from tests.conftest import child_env

# What a Ray actor does with its task's arguments, in a process whose working directory
# (first on sys.path, as Ray puts it on its workers') holds fedpriv's top-level names.
UNPICKLE = """
import json, pickle, sys
app = pickle.loads(sys.stdin.buffer.read())
print(json.dumps({"type": type(app).__name__, "server_imported": "server" in sys.modules,
                  "common": sys.modules["common"].__file__, "client": sys.modules["client.app"].__file__}))
"""


@pytest.mark.e2e  # starts a process
def test_a_pickled_client_app_ref_loads_fedpriv_in_a_folder_that_shadows_it(tmp_path):
    for package in ("server", "client", "common"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"raise ImportError('decoy {package}')\n")
    payload = ray.cloudpickle.dumps(ClientAppRef())  # as Flower's Ray backend ships it
    done = subprocess.run(
        [sys.executable, "-c", UNPICKLE], input=payload, cwd=tmp_path, capture_output=True, timeout=300, env=child_env()
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    seen = json.loads(done.stdout)
    assert seen["type"] == "ClientApp"
    assert not seen["server_imported"]  # the loader travelled by value: nothing of server/ ran first
    for path in (seen["common"], seen["client"]):
        assert Path(path).is_relative_to(ROOT), path


def test_the_ref_is_the_client_app_here_too():
    ref = ClientAppRef()
    assert ref.ref == CLIENT_APP
    assert ref.app is load(CLIENT_APP)


@pytest.mark.parametrize("bad", ["client.app", ":app", "client.app:"])
def test_a_malformed_reference_is_refused_before_anything_runs(bad):
    with pytest.raises(ValueError, match="component reference"):
        load(bad)
