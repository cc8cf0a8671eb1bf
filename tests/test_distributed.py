"""Data-parallel fine-tuning (fastbert/distributed.py): processes over gloo on the CPU, as torchrun
starts them on GPUs. Two processes with batch b must update as one process with batch b and
grad_accum 2, resume exactly, and stop together on a bad loss."""
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbert
import fastbert.cli
from fastbert import data, heads, tasks, train
from test_train import _token_features, recording_grads

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TIMEOUT_S = 180


def _sentence_features(n):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (int(torch.randint(3, 20, (1,), generator=generator)),), generator=generator)
        out.append({"input_ids": ids.tolist(), "labels": int(ids.sum() % 2)})
    return out


def _trainer(case: dict, out: Path) -> train.Trainer:
    torch.manual_seed(0)
    config = fastbert.BertConfig(**CONFIG, **(NO_DROPOUT if case.get("no_dropout") else {}))
    if case["task"] == "tokens":
        model, features = heads.BertForTokenClassification(config, num_labels=3), _token_features(case["examples"])
        if case.get("unlabelled_first_on_rank_1"):  # example 5 moved to rank 1's batch of the first step
            j = train.epoch_batches(len(features), case["train"]["batch_size"], 42, 0)[1][0]
            features[5], features[j] = features[j], features[5]
        model.spare = torch.nn.Linear(4, 4)  # a module the loss never reaches (a second head kept for later)
    else:
        model, features = heads.BertForSequenceClassification(config, num_labels=2), _sentence_features(case["examples"])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if case.get("freeze_on_rank") == rank:  # the gradient buckets follow the trained parameters
        model.bert.embeddings.word.weight.requires_grad_(False)
    settings = {**case["train"], **({"seed": rank} if case.get("seed_is_rank") else {}),
                **case.get("rank_train", {}).get(rank, {})}
    cfg = train.TrainConfig(out=out, epochs=2, lr=1e-3, progress=False, **settings)
    model.to(case.get("device", "cpu"))
    evaluate = None
    if case.get("collective_eval"):   # every process predicts its share of the dev set (tasks.evaluate(shard=True))
        def evaluate(model):
            evaluate.calls += 1
            logits = tasks.predict_logits(model, features, 3, shard=True)
            return {"accuracy": sum(int(l.argmax()) == f["labels"] for l, f in zip(logits, features)) / len(features)}

        evaluate.calls, evaluate.collective = 0, True
    trainer = train.Trainer(model, features, data.collate, cfg, evaluate,
                            lengths=[len(f["input_ids"]) for f in features] if cfg.bucket_by_length else None)
    if case.get("grad_scaler"):  # fp16's loss scaling, on the CPU (fp16 itself needs a GPU)
        trainer.scaler = torch.amp.GradScaler("cpu")
    return trainer


def _run(case: dict, out: Path, report: Path) -> dict:
    """Train as the case says; what the caller compares goes to `report` (one file per rank)."""
    trainer = _trainer(case, out)
    grads = recording_grads(trainer) if case.get("record_grads") else []
    collated, collate, draws = [], trainer.collate, []

    def counting_collate(features):
        collated.append(len(features))
        if case.get("drawing_collate"):   # an augmenting collate draws from Python's generator
            draws.append(random.random())
        return collate(features)

    trainer.collate = counting_collate
    if case.get("predict_sharded"):  # before training: the weights every process starts from
        grads = [tasks.predict_logits(trainer.model, trainer.features, 3, shard=True),
                 tasks.predict_logits(trainer.model, trainer.features[:1], 3, shard=True)]  # rank 1 has none
    if case.get("nan_on_rank") == trainer.rank:
        forward, calls = trainer.model.forward, []

        def nan_second_loss(*args, **kwargs):
            result = forward(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                result.loss = result.loss * float("nan")
            return result

        trainer.model.forward = nan_second_loss
    if case.get("resume"):
        assert trainer.resume()
    summary = trainer.train(stop_after_step=case.get("stop_after_step"))
    torch.save({"evaluations": getattr(trainer.evaluate_fn, "calls", 0),
                "weights": {k: v.cpu() for k, v in trainer.model.state_dict().items()}, "history": json.dumps(trainer.history), "grads": grads,
                "summary": json.dumps(summary), "world": trainer.world, "collated": sum(collated), "draws": draws,
                **({"buckets": len(trainer._gradient_sum.buckets), "sent_early": trainer._gradient_sum.sent_early,
                    "fallbacks": trainer._gradient_sum.fallbacks, "hooks_left": len(trainer._gradient_sum._handles)}
                   if trainer.world > 1 else {})}, report)


def _worker(rank: int, world: int, store: str, case: dict, out: str, reports: str):
    from fastbert import distributed

    torch.set_num_threads(1)
    if "bucket_bytes" in case:  # small buckets: several leave during each backward, not one at its end
        distributed.BUCKET_BYTES = case["bucket_bytes"]
    if case.get("device") == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    report = Path(reports) / f"rank{rank}.pt"
    try:
        _run(case, Path(out) / (f"rank{rank}" if case.get("out_per_rank") else ""), report)
    except BaseException as err:  # noqa: BLE001 - the parent reads what each rank raised
        report.with_suffix(".err").write_text(f"{type(err).__name__}: {err}")
    finally:
        torch.distributed.destroy_process_group()


def _processes(tmp_path: Path, case: dict, out: Path, world: int = 2, tag: str = "run") -> list:
    """Run `case` in `world` gloo processes; each rank's report, or the error it raised (as text)."""
    reports = tmp_path / f"reports-{tag}"
    reports.mkdir()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(rank, world, str(tmp_path / f"store-{tag}"), case, str(out),
                                                     str(reports))) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT_S)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        proc.kill()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s: a collective some rank never joined"
    results = []
    for rank in range(world):
        error = reports / f"rank{rank}.err"
        results.append(error.read_text() if error.exists()
                       else torch.load(reports / f"rank{rank}.pt", weights_only=True))
    return results


def _assert_same_weights(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs by {(a[name] - b[name]).abs().max()}"


@pytest.mark.parametrize("task, examples, batch_size, device", [
    pytest.param("sentences", 40, 8, "cpu", id="sentences_short_last_step"),  # 5 batches an epoch: the last step has one, rank 1 none
    pytest.param("tokens", 9, 1, "cpu", id="tokens_unlabelled_batch"),  # one sentence a batch: example 5 leaves its process no backward
    # buckets of at most 2 KB: most parameters leave alone, during the backward
    pytest.param("tokens", 9, 1, "cpu_small_buckets", id="tokens_small_buckets"),
    # Two processes on one GPU through gloo (a lent machine has one GPU; NCCL takes one a process): the
    # step record and the gradients are CUDA tensors, and the kernels train.
    pytest.param("tokens", 9, 1, "cuda", id="gpu_tokens_unlabelled_batch", marks=pytest.mark.gpu),
])
def test_two_processes_step_as_one_process_with_grad_accum_two(tmp_path, task, examples, batch_size, device):
    """The loss terms of the whole step weigh each batch, so the summed gradient is the large batch's.
    Each step's gradient is recorded with the update skipped, so every step is compared at the same
    weights (after updates, AdamW would blow float32 rounding in gradients that are zero in exact
    arithmetic, a key bias's, up to the size of a step). A parameter no process has a gradient for (a
    module the loss never reaches) must stay without one: AdamW would still decay a zero gradient's."""
    case = {"task": task, "examples": examples, "no_dropout": True, "record_grads": True, "device": device,
            "train": {"batch_size": batch_size, "save_every": 10**9}}
    if device == "cpu_small_buckets":
        case.update(device="cpu", bucket_bytes=2048)
    one = _trainer({**case, "train": {**case["train"], "grad_accum": 2}}, tmp_path / "one")
    one_grads = recording_grads(one)
    one.train()
    steps = 2 * -(-examples // batch_size // 2)
    assert len(one_grads) == steps
    ranks = _processes(tmp_path, case, tmp_path / "two")
    # each process collates only its own batches (every process collated the whole step before): 2 epochs
    collated = [r["collated"] for r in ranks if not isinstance(r, str)]
    assert sum(collated) == 2 * examples and max(collated) <= examples + batch_size, collated
    for rank, result in enumerate(ranks):
        assert not isinstance(result, str), f"rank {rank} raised {result}"
        assert result["world"] == 2 and json.loads(result["summary"])["steps"] == steps
        # small buckets leave during the backward, never late; train() leaves no hook behind
        assert (result["buckets"] > 20) == ("bucket_bytes" in case), result["buckets"]
        assert (result["sent_early"] > steps) == ("bucket_bytes" in case) and result["fallbacks"] == 0, result
        assert result["hooks_left"] == 0
        assert json.loads(result["history"]) == one.history
        assert len(result["grads"]) == steps
        for step, (a, b) in enumerate(zip(result["grads"], one_grads)):
            assert a.keys() == b.keys(), (step, a.keys() ^ b.keys())
            for name in a:  # the same sums, some in another order (an embedding row two batches share)
                torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, name=name, step=step: f"rank {rank}, step {step}, {name}: {m}")
    assert task == "sentences" or "spare.weight" not in one_grads[0]


def test_a_collate_that_draws_gets_other_draws_on_each_process(tmp_path):
    """Each process collates only its own batches: from generators seeded alike, batches 0 and 1 of a
    step got the same augmentation (found by a review helper). Python's and numpy's generators are
    seeded per rank, as torch's is for dropout."""
    case = {"task": "sentences", "examples": 16, "drawing_collate": True, "train": {"batch_size": 4}}
    ranks = _processes(tmp_path, case, tmp_path / "run")
    assert not any(isinstance(r, str) for r in ranks), ranks
    assert len(ranks[0]["draws"]) == len(ranks[1]["draws"]) == 4 and not set(ranks[0]["draws"]) & set(ranks[1]["draws"])


def test_processes_share_an_evaluation_that_says_it_is_collective(tmp_path):
    """tasks.predict_logits(shard=True): each process predicts every other feature (by length) and all
    get every logit, those one process computes; a collective evaluate runs on every process (rank 0's
    scores are kept), where another runs on rank 0 alone."""
    case = {"task": "sentences", "examples": 21, "no_dropout": True, "predict_sharded": True,
            "collective_eval": True, "train": {"batch_size": 4}}
    alone = _trainer({**case, "collective_eval": False}, tmp_path / "alone")
    unsharded = tasks.predict_logits(alone.model, alone.features, 3)
    ranks = _processes(tmp_path, case, tmp_path / "run")
    for rank, result in enumerate(ranks):
        assert not isinstance(result, str), f"rank {rank} raised {result}"
        sharded, alone_on_rank_0 = result["grads"]
        assert len(sharded) == len(unsharded) == 21 and len(alone_on_rank_0) == 1
        torch.testing.assert_close(alone_on_rank_0[0], unsharded[0], rtol=1e-5, atol=1e-6)
        for i, (a, b) in enumerate(zip(sharded, unsharded)):  # other batch compositions: float32 rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"rank {rank}, feature {i}: {m}")
        assert result["evaluations"] == 2 and [r["epoch"] for r in json.loads(result["history"])] == [1, 2]
    assert ranks[0]["history"] == ranks[1]["history"]


def test_a_shared_prediction_sends_its_rows_not_their_batches(monkeypatch):
    """A row of logits is a view of its batch's tensor, and pickling a view sends the whole batch: each
    process sent every batch once per row (SQuAD's dev set, 2 processes: about 1 GB where the logits are
    17 MB). Found by a review helper; the rows now go packed in one tensor."""
    import pickle

    from fastbert import distributed
    from test_train import _token_features

    sent = []
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "gather_to_all", lambda obj: sent.append(obj) or [obj])
    torch.manual_seed(0)
    model = heads.BertForTokenClassification(fastbert.BertConfig(**CONFIG), num_labels=3)
    logits = tasks.predict_logits(model, _token_features(16), batch_size=8, shard=True)
    mine = [x for x in logits if x is not None]   # this process's rows (the stand-in gather adds no others)
    assert len(mine) == 8
    data_bytes = sum(x.numel() for x in mine) * 4
    assert len(pickle.dumps(sent[0])) < data_bytes + 2048, (len(pickle.dumps(sent[0])), data_bytes)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of this process alone: its all-reduce sums one term, so a GradientSum's result is
    the gradient itself, and when each bucket leaves can be watched in-process."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _linear_stack(n, width=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)])


def test_gradient_buckets_leave_while_the_backward_runs(one_process_group, monkeypatch):
    """Each layer's bucket is all-reduced once the backward has given its gradients, before the layers
    below have theirs (the overlap), and the sums come back scaled, onto the parameters' gradients."""
    from fastbert import distributed

    model, twin = _linear_stack(4), _linear_stack(4)
    events = []
    for i, param in enumerate(model.parameters()):
        param.register_post_accumulate_grad_hook(lambda _p, i=i: events.append(("grad", i)))
    summing = distributed.GradientSum(list(model.parameters()), bucket_bytes=(8 * 8 + 8) * 4)  # a layer a bucket
    summing.attach()
    assert [sorted(b) for b in summing.buckets] == [[6, 7], [4, 5], [2, 3], [0, 1]]
    real = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, *a, **k: events.append(("sent", t.numel())) or real(t, *a, **k))
    x = torch.randn(5, 8)
    summing.arm()
    model(x).square().sum().backward()
    assert [e for e in events if e[0] == "sent"] == [("sent", 72)] * 4
    sent_at = [n for n, e in enumerate(events) if e[0] == "sent"]
    assert sent_at[0] < events.index(("grad", 0)) and sent_at[2] < events.index(("grad", 0))
    assert summing.finish() is False
    summing.apply([True] * 8, scale=0.5, any_late=False)
    twin(x).square().sum().backward()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine.grad, 0.5 * reference.grad, rtol=0, atol=0)
    # a step left midway (the Trainer disarms at the start of train()): the next backward sends nothing
    summing.arm()
    summing.disarm()
    sent = len([e for e in events if e[0] == "sent"])
    model(x).sum().backward()
    assert len([e for e in events if e[0] == "sent"]) == sent
    summing.remove()


def test_a_gradient_after_its_bucket_left_falls_back_to_the_plain_sum(one_process_group):
    """A bucket waits for the parameters that had gradients in the previous step: here the other
    branch's. Its bucket leaves with zeros, the gradient comes after: finish says so and apply sums the
    backward's gradients instead. A parameter no process used keeps no gradient."""
    from fastbert import distributed

    model, twin = _linear_stack(2), _linear_stack(2)
    summing = distributed.GradientSum(list(model.parameters()), bucket_bytes=(8 * 8 + 8) * 4)
    summing.attach()
    x = torch.randn(3, 8)
    for step, branch in enumerate([0, 1, 1]):
        summing.arm()
        model[branch](x).sum().backward()
        late = summing.finish()
        assert late is (step == 1), step           # step 1: branch 1 was not expected; step 2 it is
        used = [p.grad is not None for p in model.parameters()]
        summing.apply(used, scale=2.0, any_late=late)
        twin[branch](x).sum().backward()
        for mine, reference in zip(model.parameters(), twin.parameters()):
            if reference.grad is None:
                assert mine.grad is None
            else:
                torch.testing.assert_close(mine.grad, 2.0 * reference.grad, rtol=0, atol=0)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    # a process without a backward this step: every bucket leaves at finish, with zeros
    assert summing.finish() is False
    summing.apply([False] * 4, scale=1.0, any_late=False)
    assert all(p.grad is None for p in model.parameters())
    assert summing.fallbacks == 1
    # parameters of two dtypes, interleaved: buckets of consecutive parameters of one dtype (a bucket
    # kept open for its dtype across the model left only at the backward's end)
    mixed = [torch.nn.Parameter(torch.zeros(4, dtype=torch.float32 if i % 2 else torch.float64)) for i in range(5)]
    assert distributed.GradientSum(mixed).buckets == [[4], [3], [2], [1], [0]]
    assert distributed.GradientSum(mixed[1::2] + mixed[::2]).buckets == [[4, 3, 2], [1, 0]]
    # the buckets are laid out from the parameters trained when it was built
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad changed after the Trainer was built"):
        summing.attach()


def test_an_interrupted_run_over_two_processes_resumes_exactly(tmp_path):
    """Dropout on, so each rank's generator must come back as that rank left it."""
    case = {"task": "sentences", "examples": 40, "train": {"batch_size": 4, "save_every": 2, "bucket_by_length": True}}
    whole = _processes(tmp_path, case, tmp_path / "whole", tag="whole")
    stopped = _processes(tmp_path, {**case, "stop_after_step": 3}, tmp_path / "resumed", tag="stopped")
    assert all(json.loads(r["summary"]) == {"stopped_at_step": 3} for r in stopped)
    resumed = _processes(tmp_path, {**case, "resume": True}, tmp_path / "resumed", tag="resumed")
    for rank in range(2):
        assert not isinstance(resumed[rank], str), f"rank {rank} raised {resumed[rank]}"
        _assert_same_weights(whole[rank]["weights"], resumed[rank]["weights"], f"rank {rank}, resumed")
        assert resumed[rank]["history"] == whole[rank]["history"]
    _assert_same_weights(whole[0]["weights"], whole[1]["weights"], "rank 1 against rank 0")
    # one checkpoint folder, written by rank 0, with both ranks' generators
    state = torch.load(tmp_path / "resumed" / "checkpoint-10" / "trainer_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2 and not torch.equal(state["ranks"][0]["cpu_rng"], state["ranks"][1]["cpu_rng"])


def test_a_bad_loss_on_one_process_stops_every_process(tmp_path):
    """Rank 1's second loss is NaN: both raise at that step, where a lone raise would leave rank 0
    waiting in an all-reduce for good."""
    case = {"task": "sentences", "examples": 40, "nan_on_rank": 1, "train": {"batch_size": 4}}
    ranks = _processes(tmp_path, case, tmp_path / "run")
    assert ranks == ["FloatingPointError: loss became nan at step 1: lower --lr or use fp32"] * 2


def test_processes_given_other_settings_are_refused_on_every_one(tmp_path):
    """Each process would sum the gradients of its own batch order without a word."""
    case = {"task": "sentences", "examples": 40, "seed_is_rank": True, "train": {"batch_size": 4}}
    ranks = _processes(tmp_path, case, tmp_path / "run")
    assert all(r.startswith("ValueError: the 2 processes do not train the same run (1 differ from rank 0") for r in ranks)
    assert "rank 1: seed=0 on rank 0, 1 here" in ranks[1], ranks


@pytest.mark.parametrize("resume", [False, True], ids=["first_step", "resumed_onto_a_short_last_step"])
def test_a_process_without_a_backward_under_the_gradient_scaler(tmp_path, resume):
    """fp16's GradScaler sets its scale up at its first scale(): a process whose first step (of the run,
    or after a resume) ran no backward unscaled the summed gradients without one and failed, and the
    other was left waiting. Found by a review helper."""
    if resume:   # 40 sentences in batches of 8: steps of 2, 2 and 1 batches; resumed at step 2
        case = {"task": "sentences", "examples": 40, "grad_scaler": True, "train": {"batch_size": 8, "save_every": 2}}
        whole = _processes(tmp_path, case, tmp_path / "whole", tag="whole")
        _processes(tmp_path, {**case, "stop_after_step": 2}, tmp_path / "resumed", tag="stopped")
        ranks = _processes(tmp_path, {**case, "resume": True}, tmp_path / "resumed", tag="resumed")
    else:
        case = {"task": "tokens", "examples": 9, "unlabelled_first_on_rank_1": True, "grad_scaler": True,
                "train": {"batch_size": 1, "save_every": 10**9}}
        ranks = whole = _processes(tmp_path, case, tmp_path / "run")
    assert not any(isinstance(r, str) for r in ranks), ranks
    for rank in range(2):
        _assert_same_weights(whole[rank]["weights"], ranks[rank]["weights"], f"rank {rank}")
    _assert_same_weights(ranks[0]["weights"], ranks[1]["weights"], "rank 1 against rank 0")


@pytest.mark.parametrize("case, match", [
    ({"rank_train": {1: {"save_every": 3}}}, "rank 1: save_every=None on rank 0, 3 here"),
    ({"out_per_rank": True, "resume_rank_0_only": True},
     r"rank 1: resume_from='checkpoint-2' on rank 0, None here\): --out must be one folder every process sees"),
    ({"freeze_on_rank": 1}, r"rank 1: frozen_parameters=\[\] on rank 0, \['bert.embeddings.word.weight'\] here"),
], ids=["save_every_on_one_process", "out_per_machine", "frozen_on_one_process"])
def test_what_decides_when_processes_meet_must_agree(tmp_path, case, match):
    """A setting that decides whether a process joins a save or an evaluation, or a resume only some
    processes find a checkpoint for, hung every process (found by a review helper): now each raises."""
    case = {"task": "sentences", "examples": 40, "train": {"batch_size": 4}, **case}
    if case.pop("resume_rank_0_only", False):
        first = {**case, "train": {"batch_size": 4, "save_every": 2}, "stop_after_step": 2}
        _processes(tmp_path, first, tmp_path / "run", tag="first")
        case = {**first, "resume": True}
        del case["stop_after_step"]
    ranks = _processes(tmp_path, case, tmp_path / "run")
    assert all(isinstance(r, str) and r.startswith("ValueError: the 2 processes do not train the same run")
               for r in ranks), ranks
    assert re.search(match, ranks[1]), ranks[1]


def test_resume_under_another_number_of_processes_is_refused(tmp_path):
    case = {"task": "sentences", "examples": 40, "train": {"batch_size": 4, "save_every": 2}}
    _trainer(case, tmp_path / "run").train(stop_after_step=2)
    ranks = _processes(tmp_path, {**case, "resume": True}, tmp_path / "run")
    assert all(isinstance(r, str) and r.startswith("ValueError: cannot resume from") and "world_size=1 there, 2 now" in r
               for r in ranks), ranks


def test_finetune_under_torchrun_on_the_cpu(tmp_path):
    """The CLI as a user starts it on several GPUs, here two gloo processes: one report, one model."""
    sample = data.sample_path("sst2_sample.tsv")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastbert",
         "finetune", "--task", "sst2", "--train", str(sample), "--dev", str(sample), "--out", str(out),
         "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "16", "--max-dev-examples", "8",
         "--max-seq-len", "32", "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final:") == 1 and "2 processes, 4 examples a batch each" in result.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and "accuracy" in summary["final_metrics"]
    assert (out / "model" / "model.safetensors").exists() and (out / "checkpoint-2" / "trainer_state.pt").exists()


def test_a_malformed_world_size_is_named(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert fastbert.cli.main(["encode", "a sentence"]) == 2
    assert "WORLD_SIZE must be a number of processes, got 'two'" in capsys.readouterr().err


def test_commands_other_than_finetune_refuse_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fastbert.cli.main(["encode", "a sentence"]) == 2
    assert "only finetune runs over several processes (WORLD_SIZE > 1); run encode as one process" \
        in capsys.readouterr().err


@pytest.mark.parametrize("env, device, match", [
    ({"RANK": None}, "cpu", "WORLD_SIZE=2 but RANK not set: start the processes with torchrun"),
    ({}, "cuda:1", "under torchrun each process takes cuda:LOCAL_RANK"),
    ({}, "mps", "--device must be cpu or cuda"),
    ({}, "nonsense", "--device must be cpu or cuda, got 'nonsense'"),
])
def test_a_torchrun_environment_that_cannot_work_is_named(monkeypatch, tmp_path, env, device, match):
    """Before any process group is joined (which would wait for peers that never come)."""
    from fastbert import distributed

    base = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in {**base, **env}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=match):
        distributed.init_from_env(device)
    assert not torch.distributed.is_initialized()
