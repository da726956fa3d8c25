"""fedpriv as a user installs it: the wheel, its metadata, and runs outside the source tree.

The wheel is built from a copy of the tree (``pip wheel --no-deps --no-build-isolation``,
a few seconds, nothing downloaded) and installed without dependencies into a fresh venv
whose only other path is this environment's site-packages (a ``.pth``): torch and Flower
come from there, fedpriv only from the wheel, and nothing on the path leads back here.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

from server.runtime.pinning import CLIENT_APP, CONF_PACKAGE, PACKAGES
from tests.conftest import FAST, ONE_ACTOR, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DECOY = 'raise ImportError("a common package of the working directory, not fedpriv\'s")\n'


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string."""
    for stop in "[<>=!~; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower().replace("_", "-").replace(".", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # No build isolation (nothing to download): the build runs on this environment's setuptools.
    needed = int(re.search(r"setuptools>=(\d+)", " ".join(PYPROJECT["build-system"]["requires"])).group(1))
    if importlib.util.find_spec("setuptools") is None or int(version("setuptools").split(".")[0]) < needed:
        pytest.skip(f"building the wheel without isolation needs setuptools>={needed} in this environment")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in (*PACKAGES, "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "warning" not in said.lower(), said[-3000:]  # e.g. conf/'s folders taken for packages
    (built,) = out.glob("fedpriv-*.whl")
    return built


def test_wheel_holds_the_packages_and_conf_under_its_package_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {*PACKAGES, CONF_PACKAGE}  # no tests/, benchmarks/, conf/ or stray packages
    shipped = {n.split("/", 1)[1] for n in names if n.startswith(f"{CONF_PACKAGE}/")}
    source = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert source and shipped == source | {"__init__.py"}
    for package in PACKAGES:
        tracked = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
        assert tracked <= set(names), sorted(tracked - set(names))


def test_wheel_metadata_declares_the_command_entry_points_and_scipy(wheel):
    with zipfile.ZipFile(wheel) as whl:
        info = next(n.split("/")[0] for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        metadata = whl.read(f"{info}/METADATA").decode()
    assert (
        "[fedpriv.commands]\naudit = client.canary_audit:run_audit\ndevice-log = client.privacy.device_log:main"
        in entry_points
    )
    assert "fedpriv = server.cli:main" in entry_points
    assert "Requires-Dist: scipy" in metadata


def test_the_extras_the_code_imports_are_in_the_dev_extra():
    # The tests run them: `pip install -e ".[dev]"` must bring every imported extra.
    extras = PYPROJECT["project"]["optional-dependencies"]
    dev = {_name(r) for r in extras["dev"]}
    assert {_name(r) for extra in IMPORTED_EXTRAS for r in extras[extra]} <= dev


def test_pyproject_names_the_same_client_app_and_exactly_the_packages():
    assert PYPROJECT["tool"]["flwr"]["app"]["components"]["clientapp"] == CLIENT_APP  # `flwr run`'s copy
    setuptools = PYPROJECT["tool"]["setuptools"]
    # Listed exactly: every package folder of the source tree, subpackages included (a
    # subpackage left out would be missing from the wheel, and nothing else would say so).
    on_disk = [
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    ]
    assert sorted(setuptools["packages"]) == sorted([*on_disk, CONF_PACKAGE])
    assert setuptools["package-dir"] == {CONF_PACKAGE: "conf"}
    assert PYPROJECT["project"]["entry-points"]["fedpriv.commands"] == {
        "audit": "client.canary_audit:run_audit",
        "device-log": "client.privacy.device_log:main",
        "predict-device": "client.personal_predict:main",
    }


#: Optional extras whose packages fedpriv imports only where a setting asks for them
#: (``tracking=mlflow``: server/tracking/mlflow_client.py, imported when the tracker opens).
IMPORTED_EXTRAS = ("mlflow",)


def test_every_third_party_import_is_a_declared_dependency():
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    declared |= {_name(r) for extra in IMPORTED_EXTRAS for r in extras[extra]}
    dists = packages_distributions()
    missing = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                        continue
                    provided_by = {_name(d) for d in dists.get(top, [top])}
                    if not provided_by & declared:
                        missing.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def _venv_with(wheel: Path, where: Path) -> Path:
    """A fresh venv holding the wheel; its dependencies come from this environment's site-packages."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=_outside_env(),
    ).stdout.strip()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_outside_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Then the dependencies. A path in a .pth is added as it is: the .pth files inside it
    # (this environment's editable install of fedpriv) are not run, so fedpriv comes from
    # the wheel alone (and pip, above, did not see this environment's fedpriv).
    Path(site, "fedpriv-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert (venv / "bin" / "fedpriv").is_file()
    return venv


def _outside_env() -> dict:
    """This environment without a way back to the source tree."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}


def _decoy_cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "elsewhere"
    (cwd / "common").mkdir(parents=True)
    (cwd / "common" / "__init__.py").write_text(DECOY)
    assert not cwd.resolve().is_relative_to(ROOT.resolve())
    return cwd


@pytest.mark.e2e  # builds and installs a wheel
def test_installed_wheel_reads_its_packaged_conf_from_another_directory(wheel, tmp_path):
    venv = _venv_with(wheel, tmp_path)
    cwd = _decoy_cwd(tmp_path)
    done = subprocess.run(
        [venv / "bin" / "fedpriv", "simulate", "--info", "searchpath", "model=tiny_bert"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=_outside_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"pkg://{CONF_PACKAGE}" in done.stdout
    where = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import server.runtime.pinning as c, json; c.pin(); "
            "import common, fedpriv_conf; print(json.dumps([common.__file__, fedpriv_conf.__file__]))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_outside_env(),
    )
    assert where.returncode == 0, where.stderr[-3000:]
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), path


@pytest.mark.e2e
def test_installed_wheel_simulates_from_a_folder_with_its_own_common_package(wheel, tmp_path):
    # `fedpriv simulate model=tiny_bert num_clients=2 rounds=2` as a new user runs it: the
    # wheel in a venv of its own, started in a folder outside the repository that holds a
    # `common/` package of its own. Ray puts that folder first on every actor's path; the
    # clients must still import fedpriv's packages and train in every round.
    venv = _venv_with(wheel, tmp_path)
    cwd = _decoy_cwd(tmp_path)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            venv / "bin" / "fedpriv",
            "simulate",
            *FAST,
            ONE_ACTOR,
            "num_clients=2",
            "rounds=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=_outside_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["clients_trained"] for r in rounds] == [2, 2], done.stderr[-3000:]
    assert "not fedpriv's" not in done.stdout + done.stderr  # the decoy was never imported
