"""Where fedpriv's own code lives, and the one name by which the server reaches client code.

- ``CLIENT_APP`` is the ClientApp's component string, loaded by reference as Flower itself
  loads it: the only place in ``server/`` that names the client package. pyproject's
  ``[tool.flwr.app.components]`` repeats it for ``flwr run`` (a test keeps the two equal);
  nothing reads pyproject at run time.
- ``pin()`` makes the top-level names ``server``, ``client``, ``common`` and the config
  package ``fedpriv_conf`` (``conf/``, shipped as package data) resolve to the folder this
  ``server`` came from (``ROOT``: a checkout, or site-packages for a wheel), whatever
  ``sys.path`` holds first. A user's working directory may have a ``common/`` of its own:
  ``python -m`` puts the working directory first on the path, and Ray puts the driver's
  working directory first on every worker's (its ``py_driver_sys_path``).
- ``ClientAppRef`` is the ClientApp handed to Flower's simulation engine. Flower's Ray
  backend pickles the ClientApp into every actor task, and unpickling it imported
  ``client.app`` through the actor's ``sys.path``: a ``common/`` in the working directory
  was imported instead of ours, in every round. Pickled, a ``ClientAppRef`` is only its
  reference and ``ROOT``; the actor pins fedpriv's packages to ``ROOT`` before it imports
  anything of fedpriv, so it runs the same code as the process that started it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The ClientApp, as ``flwr run`` loads it (pyproject's [tool.flwr.app.components] clientapp).
CLIENT_APP = "client.app:app"
#: The import packages of the fedpriv distribution; the config package is ``conf/`` in a checkout.
PACKAGES = ("server", "client", "common")
CONF_PACKAGE = "fedpriv_conf"
#: The folder that holds these packages.
ROOT = Path(__file__).resolve().parents[2]


def _loaders():
    """(pin, load), built inside a function on purpose: cloudpickle, which Ray uses, ships a
    function it cannot look up by module name by value, so a Ray worker runs ``load`` without
    first importing ``server`` through a path that a working directory may shadow."""

    def pin(root: str, packages: tuple[str, ...], conf_package: str) -> None:
        import os
        import sys
        from importlib.machinery import PathFinder
        from importlib.util import spec_from_file_location

        if any(getattr(finder, "fedpriv_root", None) == root for finder in sys.meta_path):
            return

        class Pinned:  # a meta path finder for fedpriv's own top-level names only
            fedpriv_root = root

            @staticmethod
            def find_spec(name, path=None, target=None):
                if name in packages:
                    return PathFinder.find_spec(name, [root])
                if name == conf_package:
                    installed = PathFinder.find_spec(name, [root])  # a wheel: site-packages/fedpriv_conf
                    init = os.path.join(root, "conf", "__init__.py")  # a checkout: conf/
                    if installed is None and os.path.isfile(init):
                        return spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
                    return installed
                return None

        sys.meta_path.insert(0, Pinned)

    def load(ref: str, root: str, packages: tuple[str, ...], conf_package: str) -> Any:
        import importlib

        module, sep, attributes = ref.partition(":")
        if not (module and sep and attributes):
            raise ValueError(f"{ref!r} is not a component reference of the form 'package.module:attribute'")
        pin(root, packages, conf_package)
        obj = importlib.import_module(module)
        for name in attributes.split("."):
            obj = getattr(obj, name)
        return obj

    return pin, load


_pin, _load = _loaders()


def pin() -> None:
    """Resolve fedpriv's packages (and ``fedpriv_conf``) from ``ROOT`` in this process."""
    _pin(str(ROOT), PACKAGES, CONF_PACKAGE)


def load(ref: str) -> Any:
    """The object a component reference (``package.module:attribute``) names, fedpriv pinned to ``ROOT``."""
    return _load(ref, str(ROOT), PACKAGES, CONF_PACKAGE)


class ClientAppRef:
    """A ClientApp known by its reference; pickled (into a Ray actor) it is that reference.

    Loaded here first, so that a bad reference fails before Ray starts; unpickled, it is
    the ClientApp itself, loaded in the actor with fedpriv pinned to this ``ROOT``.
    """

    def __init__(self, ref: str = CLIENT_APP) -> None:
        self.ref = ref
        self.app = load(ref)

    def __call__(self, *args, **kwargs):
        return self.app(*args, **kwargs)

    def __reduce__(self):
        return _load, (self.ref, str(ROOT), PACKAGES, CONF_PACKAGE)
