"""Device handling without a GPU: selection, autocast choice, memory release, node
config parsing, and BatchMemoryManager keeping the logical batch and the accounting."""

import copy

import pytest
import torch

import client.training.dp_train as dp_train
from client import device as dev
from client.privacy.node_config import node_identity
from client.training.dp_train import DPSettings, TrainSettings, local_train
from common.errors import ConfigError
from common.model.state import trainable_state
from tests.client.test_dp_train import tiny_data, tiny_model


@pytest.fixture
def fake_gpu(monkeypatch):
    """Play a CUDA machine: is_available and bf16 support as the test says."""

    def make(available=True, bf16=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return make


def test_select_device(fake_gpu):
    fake_gpu(available=False)
    assert dev.select_device("auto") == torch.device("cpu")
    assert dev.select_device(None) == torch.device("cpu")
    assert dev.select_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dev.select_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        dev.select_device("tpu")
    fake_gpu(available=True)
    assert dev.select_device("auto") == torch.device("cuda")
    assert dev.select_device("cuda:1") == torch.device("cuda:1")
    assert dev.select_device("cpu") == torch.device("cpu")  # an explicit cpu stays cpu


def test_autocast_choice(fake_gpu):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for precision in ("fp32", "bf16", "fp16", "auto", None):
        assert dev.autocast_dtype(cpu, precision) is None  # never on CPU
    fake_gpu(bf16=True)
    assert dev.autocast_dtype(cuda, "fp32") is None
    assert dev.autocast_dtype(cuda, "auto") is torch.bfloat16
    assert dev.autocast_dtype(cuda, "bf16") is torch.bfloat16
    assert dev.autocast_dtype(cuda, "fp16") is torch.float16
    fake_gpu(bf16=False)
    assert dev.autocast_dtype(cuda, "auto") is None  # no bf16: stay in fp32 rather than fp16
    with pytest.raises(RuntimeError, match="bf16"):
        dev.autocast_dtype(cuda, "bf16")
    with pytest.raises(ValueError, match="precision"):
        dev.autocast_dtype(cuda, "int8")
    assert isinstance(dev.autocast(cuda, None), type(dev.autocast(cpu, None)))


def test_release_memory_empties_the_cuda_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    dev.release_memory()
    assert calls == [1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # never touched CUDA: nothing to do
    collected = []
    monkeypatch.setattr(dev.gc, "collect", lambda *a: collected.append(1))
    dev.release_memory()
    assert calls == [1]
    assert collected == []  # no full collection per message on CPU (it cost 0.36 s a message)


def test_node_config_keys(tmp_path):
    cfg = {"state_dir": None}
    who = node_identity(
        {
            "state-dir": str(tmp_path / "s"),
            "data-path": "~/sms.csv",
            "device": "CUDA",
            "max-physical-batch-size": 8,
            "max-epsilon": "2.5",
        },
        cfg,
    )
    assert who.state_dir == str((tmp_path / "s").resolve())
    assert who.device == "cuda" and who.max_physical_batch_size == 8 and who.policy.max_epsilon == 2.5
    assert who.data_path.endswith("sms.csv") and "~" not in who.data_path
    # No client-id with a data-path: an id created once and kept in the state dir.
    assert who.client_id.startswith("device-")
    assert node_identity({"state-dir": str(tmp_path / "s"), "data-path": "x.csv"}, cfg).client_id == who.client_id
    assert node_identity({"state-dir": str(tmp_path / "s"), "client-id": "alice"}, cfg).client_id == "alice"
    demo = node_identity(
        {"partition-id": 1, "num-partitions": 2}, {"state_dir": str(tmp_path / "sim")}, simulation=True
    )
    assert (demo.client_id, demo.partition_id, demo.state_dir) == ("1", 1, str(tmp_path / "sim"))
    with pytest.raises(ConfigError, match="node-config state-dir"):
        node_identity({"partition-id": 0}, cfg)  # deployment: the server holds no state_dir
    # Nor may it name one: a device in deployment never reads the run config's state_dir.
    with pytest.raises(ConfigError, match="node-config state-dir"):
        node_identity({"partition-id": 0}, {"state_dir": str(tmp_path / "server-chosen")})
    assert not (tmp_path / "server-chosen").exists()
    for key, bad in (
        ("max-physical-batch-size", 0),
        ("max-physical-batch-size", 2.5),
        ("max-epsilon", "x"),
        ("device", "tpu"),
        ("client-id", "../x"),
        ("require-dp", "maybe"),
        ("max-delta", 1.0),
        ("max-delta", "x"),
        ("max-client-clip-norm", -1),
    ):
        with pytest.raises(ConfigError, match=f"node-config {key}"):
            node_identity({"state-dir": str(tmp_path / "s"), key: bad}, cfg)


def test_device_policy_defaults(tmp_path, monkeypatch):
    """In deployment a device requires its own noise and caps δ by its n; a simulated client
    (FEDPRIV_SIMULATION, set by the simulation's host) has no policy beyond the run's."""
    monkeypatch.delenv("FEDPRIV_SIMULATION", raising=False)
    device = node_identity({"state-dir": str(tmp_path / "s")}, {})
    assert device.policy.require_dp and device.policy.deployed
    assert device.policy.delta_limit(100) == 1e-5 and device.policy.delta_limit(50_000) == pytest.approx(2e-6)
    owner = node_identity(
        {
            "state-dir": str(tmp_path / "s"),
            "require-dp": "false",
            "max-delta": "1e-4",
            "max-client-clip-norm": 2,
            "max-epsilon": 1,
        },
        {},
    )
    assert not owner.policy.require_dp and owner.policy.delta_limit(10) == 1e-4
    assert (owner.policy.max_client_clip_norm, owner.policy.max_epsilon) == (2.0, 1.0)
    monkeypatch.setenv("FEDPRIV_SIMULATION", "1")
    sim = node_identity({"partition-id": 0}, {"state_dir": str(tmp_path / "sim")})
    assert not sim.policy.require_dp and sim.policy.delta_limit(10) is None
    assert sim.state_dir == str(tmp_path / "sim")


def _seeded_generators(monkeypatch, seed):
    """Make the os.urandom generators reproducible, so two runs draw the same batches."""
    counter = iter(range(1000))

    def gen(device="cpu"):
        return torch.Generator(device=device).manual_seed(seed + next(counter))

    monkeypatch.setattr(dp_train, "urandom_generator", gen)


def test_batch_memory_manager_keeps_logical_batch_and_accounting(monkeypatch):
    data = tiny_data(48)
    base = tiny_model()
    prior = ((0.9, 0.25, 3),)  # a ledger that already holds spend
    outcomes = {}
    for cap in (None, 3):
        _seeded_generators(monkeypatch, seed=7)
        model = copy.deepcopy(base)
        before = trainable_state(model)
        result = local_train(
            model,
            data,
            TrainSettings(
                epochs=2,
                batch_size=12,
                lr=0.5,
                optimizer="sgd",
                dp=DPSettings(0.0, 1.0, "rdp", prior),
                max_physical_batch_size=cap,
            ),
        )
        outcomes[cap] = (result, before, trainable_state(model))
    plain, split = outcomes[None][0], outcomes[3][0]
    # Same Poisson batches, same logical steps, the very same accountant history.
    assert split.steps == plain.steps == 2 * 4
    assert split.history == plain.history
    assert split.history[0] == (0.9, 0.25, 3) and split.history[-1] == (0.0, 0.25, 8)
    assert split.sample_rate == plain.sample_rate == 0.25
    # With sigma = 0 the update is deterministic: split physical batches sum to the same gradient.
    after_plain, before = outcomes[None][2], outcomes[None][1]
    assert any(not torch.equal(after_plain[k], before[k]) for k in before)  # training moved something
    for k, v in after_plain.items():
        torch.testing.assert_close(outcomes[3][2][k], v, rtol=1e-4, atol=1e-5)


def test_physical_batches_are_capped(monkeypatch):
    seen = []
    model = tiny_model()
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.forward = spy
    _seeded_generators(monkeypatch, seed=3)
    local_train(
        model,
        tiny_data(40),
        TrainSettings(
            epochs=1,
            batch_size=20,
            lr=0.1,
            optimizer="sgd",
            dp=DPSettings(1.0, 1.0, "rdp", ()),
            max_physical_batch_size=4,
        ),
    )
    assert seen and max(seen) <= 4
    # Without DP the same cap splits the batch into accumulated chunks.
    seen.clear()
    local_train(
        model,
        tiny_data(40),
        TrainSettings(epochs=1, batch_size=20, lr=0.1, optimizer="sgd", dp=None, max_physical_batch_size=4),
    )
    assert seen and max(seen) <= 4


def test_autocast_path_runs_under_opacus_and_keeps_fp32_weights(monkeypatch):
    # The CUDA autocast path, exercised with CPU autocast (bf16): Opacus computes the
    # per-example grads from bf16 activations, clips and noises in fp32.
    _seeded_generators(monkeypatch, seed=5)
    model = tiny_model()
    before = trainable_state(model)
    result = local_train(
        model,
        tiny_data(24),
        TrainSettings(
            epochs=1,
            batch_size=8,
            lr=0.5,
            optimizer="sgd",
            dp=DPSettings(0.5, 1.0, "rdp", ()),
            amp_dtype=torch.bfloat16,
        ),
    )
    after = trainable_state(model)
    assert result.steps == 3 and result.history == [(0.5, 1 / 3, 3)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)
