"""The training loop: schedule, decay groups, reproducibility and an exact resume."""
import pytest
import torch

import fastbert
from fastbert import heads, train

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32)


def _features(n=40):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        ids = torch.randint(1, 64, (length,), generator=generator)
        out.append({"input_ids": ids, "label": int(ids.sum() % 2)})
    return out


def _collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_ids"])] = e["input_ids"]
        mask[row, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def _trainer(out, **overrides):
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    cfg = train.TrainConfig(out=out, **{**dict(epochs=2, batch_size=8, lr=1e-3, save_every=3, progress=False), **overrides})
    features = _features()
    return train.Trainer(model, features, _collate, cfg, lengths=[len(f["input_ids"]) for f in features])


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    whole = _trainer(tmp_path / "whole")
    whole.train()
    first = _trainer(tmp_path / "resumed")
    assert first.train(stop_after_step=6) == {"stopped_at_step": 6}   # checkpoint at step 6 was written
    second = _trainer(tmp_path / "resumed")
    torch.manual_seed(1234)  # a fresh process would start from another RNG state: resume must restore it
    assert second.resume() and second.step == 6
    second.train()
    assert second.step == whole.step == 10
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the epoch cut by the interruption reports the mean loss of all its batches, not just the resumed ones
    assert second.history == whole.history


def test_resume_from_a_checkpoint_at_the_last_step_closes_the_epoch(tmp_path):
    """save_every that divides the run: the last checkpoint comes before the epoch's evaluation;
    a run stopped there and resumed still evaluates and records that epoch (it ended without it)."""
    def trainer(out):
        t = _trainer(out, save_every=5)
        t.evaluate_fn = lambda model: {"score": 0.5}
        return t

    whole = trainer(tmp_path / "whole")
    whole.train()
    stopped = trainer(tmp_path / "resumed")
    stopped.train(stop_after_step=10)
    again = trainer(tmp_path / "resumed")
    assert again.resume() and again.step == 10
    summary = again.train()
    assert summary["epochs"] == whole.history and [h["epoch"] for h in whole.history] == [1, 2]
    assert whole.history[-1]["score"] == 0.5


def test_resume_with_other_settings_is_refused(tmp_path):
    _trainer(tmp_path).train(stop_after_step=3)
    other = _trainer(tmp_path, batch_size=4)
    with pytest.raises(ValueError, match=r"cannot resume .*batch_size=8 there, 4 now"):
        other.resume()



def test_resume_from_a_broken_trainer_state_names_the_file(tmp_path):
    _trainer(tmp_path).train(stop_after_step=3)
    path = tmp_path / (tmp_path / "latest").read_text().strip() / "trainer_state.pt"
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=r"cannot resume: .*trainer_state\.pt could not be loaded with weights_only=True"):
        _trainer(tmp_path).resume()
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match=r"trainer_state\.pt is not a fastbert trainer state \(it lacks \['optimizer'"):
        _trainer(tmp_path).resume()
    torch.save({"step": 3, "payload": print}, path)  # code in the pickle: weights_only refuses it
    with pytest.raises(ValueError, match="could not be loaded with weights_only=True"):
        _trainer(tmp_path).resume()
    path.write_bytes(intact)
    assert _trainer(tmp_path).resume()

def test_same_seed_same_run(tmp_path):
    a, b = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    a.train(), b.train()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_loss_goes_down_and_checkpoint_is_loadable(tmp_path):
    t = _trainer(tmp_path, bucket_by_length=True)
    t.cfg.epochs = 6
    t.__init__(t.model, t.features, t.collate, t.cfg, lengths=[len(f["input_ids"]) for f in t.features])
    summary = t.train()
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert losses[-1] < losses[0]
    latest = tmp_path / (tmp_path / "latest").read_text().strip()
    again = heads.BertForSequenceClassification.from_pretrained(latest)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), t.model.state_dict().values()))
    assert len(list(tmp_path.glob("checkpoint-*"))) == 1  # older checkpoints are removed


def test_bf16_autocast_run_trains_with_float32_master_weights(tmp_path):
    """Mixed precision as on a GPU (there bf16 is the default), through CPU autocast: the loop
    runs, parameters and their optimizer state stay float32, the loss goes down."""
    t = _trainer(tmp_path, precision="bf16")
    assert t.autocast == torch.bfloat16
    t.cfg.epochs = 6
    t.__init__(t.model, t.features, t.collate, t.cfg, lengths=[len(f["input_ids"]) for f in t.features])
    summary = t.train()
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert all(l == l for l in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for st in t.optimizer.state.values() for k, v in st.items() if k != "step")


def test_precision_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert train._autocast_dtype("auto", cpu) is None and train._autocast_dtype("fp32", gpu) is None
    assert train._autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train._autocast_dtype("fp16", cpu)
    assert train._autocast_dtype("fp16", gpu) == torch.float16


def test_decay_groups_and_schedule():
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    decay, exempt = train.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "norm" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in exempt["params"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = train.linear_warmup_decay(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] < lrs[3] and lrs[-1] > 0


def test_epoch_batches_are_a_permutation_and_deterministic():
    batches = train.epoch_batches(103, 10, seed=3, epoch=1, lengths=list(range(103)))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103)) and batches == train.epoch_batches(103, 10, seed=3, epoch=1, lengths=list(range(103)))
    assert batches != train.epoch_batches(103, 10, seed=3, epoch=2, lengths=list(range(103)))


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train.TrainConfig(out=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="precision must be"):
        train.TrainConfig(out=tmp_path, precision="fp8")
    # silently accepted before: save_every=0 wrote no checkpoint at all; a warm-up ratio outside [0, 1]
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        train.TrainConfig(out=tmp_path, save_every=0)
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\]"):
        train.TrainConfig(out=tmp_path, warmup_ratio=-0.5)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        train.TrainConfig(out=tmp_path, weight_decay=-1.0)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file; checkpoints need a folder"):
        train.TrainConfig(out=tmp_path / "a_file")


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    """A NaN loss raises a clear error at its step, and the weights stay as they were: the check
    (the step's one host sync) comes before the optimizer can spread the NaN."""
    trainer = _trainer(tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    real_forward = trainer.model.forward

    def nan_loss(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_compiled_training_forward_matches_eager(tmp_path):
    """TrainConfig(compile=...) trains through torch.compile (AOTAutograd here: the forward and
    backward graphs a compiled run uses, without inductor's minutes of C++ compiling on a CPU):
    the same losses and weights as eager, across batches of several lengths."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runs = {}
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG, **no_dropout), num_labels=2)
        cfg = train.TrainConfig(out=tmp_path / str(backend), max_steps=4, batch_size=8, lr=1e-3, progress=False,
                                compile=backend)
        trainer = train.Trainer(model, _features(), _collate, cfg)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer.train()
        runs[backend] = trainer
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (backend is not None), f"compile={backend}: {graphs} graphs compiled"
    compiled = runs["aot_eager"]
    losses = [h["train_loss"] for h in runs[None].history], [h["train_loss"] for h in compiled.history]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(runs[None].model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(ValueError, match="torch.compile backend"):
        train.TrainConfig(out=tmp_path, compile="fastest")
