"""fastbert.Predictor: a fine-tuned model folder as a function of raw inputs, against the model run by
hand on the tokenizer's encodings."""
import json

import pytest
import torch

import fastbert
from fastbert import data, tasks

NER_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Models as `finetune` saves them (config with fastbert_task + tokenizer), heads drawn, not trained."""
    root = tmp_path_factory.mktemp("predictor")
    tokenizer = fastbert.Tokenizer.from_pretrained("default")
    folders = {}
    specs = {"sst2": tasks.TaskSpec.preset("sst2", max_seq_len=32), "stsb": tasks.TaskSpec.preset("stsb", max_seq_len=32),
             "ner": tasks.TaskSpec(name="tagging", kind="tagging", labels=NER_TAGS, max_seq_len=8),
             "squad": tasks.TaskSpec.preset("squad", max_seq_len=48, doc_stride=16, max_question_len=16),
             "squad_v2": tasks.TaskSpec.preset("squad_v2", max_seq_len=48, doc_stride=16, max_question_len=16)}
    for name, spec in specs.items():
        torch.manual_seed(len(name))
        model = tasks.build_model(spec, "default")
        if name == "ner":   # a head that finds entities: B-PER on capitalised pieces, I-PER on "##" ones
            with torch.no_grad():
                model.classifier.weight.mul_(20)
        model.save_pretrained(root / name)
        tokenizer.save(root / name)
        folders[name] = root / name
    return folders


def _by_hand(folder, texts, pairs=None):
    model, spec = tasks.load_finetuned(folder)
    enc = fastbert.Tokenizer.from_pretrained(folder)(texts, pairs, max_length=spec.max_seq_len, padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_classification_gives_the_label_and_its_probability(saved):
    predict = fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu")
    texts = ["a gripping , beautifully acted film", "a tedious mess", "fine"]
    found = predict(texts)
    probs = torch.softmax(_by_hand(saved["sst2"], texts), -1)
    for result, p in zip(found, probs):
        assert result["scores"] == pytest.approx({"0": p[0].item(), "1": p[1].item()}, abs=1e-6)
        assert result["label"] == str(int(p.argmax())) and result["score"] == pytest.approx(p.max().item(), abs=1e-6)
    assert predict(texts[1]) == found[1]                                 # a str in, one result out
    assert json.loads(json.dumps(found)) == found                        # plain Python


def test_a_pair_model_scores_the_packed_pair(saved):
    predict = fastbert.Predictor.from_pretrained(saved["stsb"], device="cpu", batch_size=1)
    a, b = ["A man is playing a guitar.", "Stocks fell."], ["Someone plays an instrument.", "Markets rose sharply today."]
    expected = _by_hand(saved["stsb"], a, b).squeeze(-1)
    assert [r["score"] for r in predict(a, b)] == pytest.approx(expected.tolist(), abs=1e-5)
    assert predict(a[0], b[0])["score"] == pytest.approx(expected[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="takes text pairs: give text_pairs too"):
        predict(a)
    with pytest.raises(ValueError, match="texts and text_pairs must match: 2 and 1"):
        predict(a, b[:1])
    with pytest.raises(ValueError, match="texts and text_pairs must match: a str and a list"):
        predict(a[0], b[:1])


def test_tagging_gives_each_words_tag_and_the_entities_they_make(saved):
    """Words from whitespace or given; a sentence past max_seq_len (8) tagged in pieces; a zero-width
    space has no piece (tag None, never in an entity); the entities are metrics.chunks of the tags."""
    from fastbert import metrics

    predict = fastbert.Predictor.from_pretrained(saved["ner"], device="cpu")
    text = "John Smith met Anna Lee in New York \u200b on Monday with Peter"
    found = predict(text)
    words = text.split()
    assert found["words"] == words and len(found["tags"]) == len(words) and found["tags"][8] is None
    assert all(t in NER_TAGS for i, t in enumerate(found["tags"]) if i != 8)
    chunks = sorted(metrics.chunks([t or "O" for t in found["tags"]]), key=lambda c: c[1])
    assert [(e["type"], e["first"], e["last"]) for e in found["entities"]] == [(k, a, b) for k, a, b in chunks]
    assert all(e["text"] == " ".join(words[e["first"]:e["last"] + 1]) for e in found["entities"])
    assert found["entities"], "the scaled head tags something"
    assert predict(words=words) == found and predict(words=[words, ["Paris"]])[0] == found
    with pytest.raises(ValueError, match="takes texts or words=..., one of them"):
        predict(text, words=words)
    with pytest.raises(TypeError, match="words must be a list of words"):   # tagged letter by letter before
        predict(words="John Smith")


def test_question_answering_gives_the_answer_its_span_and_score(saved):
    predict = fastbert.Predictor.from_pretrained(saved["squad"], device="cpu", n_best=3)
    context = ("The Broncos defeated the Panthers 24-10 to earn their third Super Bowl title. The game was played "
               "on February 7, 2016, at Levi's Stadium in Santa Clara, California. ") * 2   # several windows
    found = predict(question="Where was the game played?", context=context)
    assert context[found["start"]:found["end"]] == found["answer"] and found["answer"]
    assert len(found["n_best"]) == 3 and found["n_best"][0] == {k: found[k] for k in ("answer", "start", "end", "score")}
    assert [c["score"] for c in found["n_best"]] == sorted((c["score"] for c in found["n_best"]), reverse=True)
    # the same answer and score as the evaluation's post-processing
    model, spec = tasks.load_finetuned(saved["squad"])
    tokenizer = fastbert.Tokenizer.from_pretrained(saved["squad"])
    example = data.SquadExample(id="q", title="", question="Where was the game played?", context=context, answers=[],
                                answer_starts=[])
    features = data.build_squad_features([example], tokenizer, spec.max_seq_len, spec.doc_stride,
                                         max_question_tokens=spec.max_question_len)
    logits = tasks.predict_logits(model, features)
    width = max(l.shape[0] for l in logits)
    start, end = torch.zeros(len(logits), width), torch.zeros(len(logits), width)
    for i, l in enumerate(logits):
        start[i, :l.shape[0]], end[i, :l.shape[0]] = l[:, 0], l[:, 1]
    (answer, score), *_ = data.predict_answers([example], features, start, end, n_best=3, return_n_best=True)["q"]
    assert (found["answer"], found["score"]) == (answer, pytest.approx(score, abs=1e-6))
    two = predict(question=["Who won?", "When?"], context=["The Broncos won.", "On February 7, 2016."])
    assert len(two) == 2 and all(r["answer"] for r in two)
    nothing = predict(question="Who won?", context="")                  # no passage token: no answer
    assert nothing == {"answer": "", "start": -1, "end": -1, "score": None, "n_best": []}
    json.dumps(nothing, allow_nan=False)                                  # strict JSON (it held -inf)
    with pytest.raises(ValueError, match="takes question=... and context=..., not texts"):
        predict("Who won?")
    with pytest.raises(ValueError, match="question and context must match: 2 and 1"):
        predict(question=["a?", "b?"], context=["c"])


def test_a_squad_v2_model_may_answer_nothing(saved):
    """v2.0: the answer is "" (span -1, -1) when the null score beats the best span's by more than the
    threshold; null_score_diff is that margin, the same as the evaluation's post-processing gives."""
    context = "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California. " * 2
    question = "Where was the game played?"
    found = fastbert.Predictor.from_pretrained(saved["squad_v2"], device="cpu", n_best=3)(question=question,
                                                                                            context=context)
    model, spec = tasks.load_finetuned(saved["squad_v2"])
    example = data.SquadExample(id="q", title="", question=question, context=context, answers=[], answer_starts=[])
    features = data.build_squad_features([example], fastbert.Tokenizer.from_pretrained(saved["squad_v2"]),
                                         spec.max_seq_len, spec.doc_stride, max_question_tokens=spec.max_question_len)
    spans, odds = tasks.answers_from_logits(model, spec, [example], features, tasks.predict_logits(model, features),
                                            null_score_diff_threshold=spec.null_score_diff_threshold,
                                            return_null_odds=True)
    assert found["null_score_diff"] == pytest.approx(odds["q"], abs=1e-5)
    best_span = tasks.answers_from_logits(model, spec, [example], features, tasks.predict_logits(model, features),
                                          null_score_diff_threshold=float("inf"))["q"]
    assert best_span and found["answer"] == spans["q"] == ("" if odds["q"] > 0 else best_span)
    assert len(found["n_best"]) == 4 and sum(c["answer"] == "" for c in found["n_best"]) == 1  # 3 spans + the null
    for threshold, nothing in ((-1e9, True), (1e9, False)):
        predict = fastbert.Predictor.from_pretrained(saved["squad_v2"], device="cpu",
                                                     null_score_diff_threshold=threshold)
        result = predict(question=question, context=context)
        assert (result["answer"] == "") == nothing and ((result["start"], result["end"]) == (-1, -1)) == nothing
        assert result["null_score_diff"] == pytest.approx(odds["q"], abs=1e-5)
    empty = fastbert.Predictor.from_pretrained(saved["squad_v2"], device="cpu")(question="Who?", context="")
    assert (empty["answer"], empty["start"], empty["null_score_diff"]) == ("", -1, None)   # no span: inf, as null
    json.dumps(empty, allow_nan=False)
    with pytest.raises(ValueError, match=r"null_score_diff_threshold is for a question-answering model that may "
                                         r"answer no answer \(SQuAD v2\.0, --task squad_v2\); this one is qa \(squad\)"):
        fastbert.Predictor.from_pretrained(saved["squad"], device="cpu", null_score_diff_threshold=1.0)
    with pytest.raises(ValueError, match="null_score_diff_threshold must be a number, got nan"):
        fastbert.Predictor.from_pretrained(saved["squad_v2"], device="cpu", null_score_diff_threshold=float("nan"))


def test_mistakes_are_named(saved, tmp_path):
    predict = fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu")
    with pytest.raises(TypeError, match="texts must be a str or a non-empty list of str, got int"):
        predict(3)
    with pytest.raises(TypeError, match="texts must be a str or a non-empty list of str, got list"):
        predict([])
    with pytest.raises(ValueError, match="question/context are for a question-answering model"):
        predict(question="Who?", context="Me.")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu", batch_size=0)
    # checked when built, not at a service's first request (fp64 ran as fp16 before; n_best 0 as 1)
    with pytest.raises(ValueError, match="precision must be auto, fp32, bf16 or fp16, got 'fp64'"):
        fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu", precision="fp64")
    for bad in (0, 33, True):
        with pytest.raises(ValueError, match="n_best must be an int in 1..32"):
            fastbert.Predictor.from_pretrained(saved["squad"], device="cpu", n_best=bad)
    (tmp_path / "config.json").write_text((saved["sst2"] / "config.json").read_text())
    with pytest.raises(ValueError, match="holds no tokenizer"):
        fastbert.Predictor.from_pretrained(tmp_path)


def test_bf16_autocast_on_the_cpu_gives_the_same_labels(saved):
    texts = ["a gripping , beautifully acted film", "a tedious mess"]
    fp32 = fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu")(texts)
    bf16 = fastbert.Predictor.from_pretrained(saved["sst2"], device="cpu", precision="bf16")(texts)
    for a, b in zip(fp32, bf16):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-2) and isinstance(b["score"], float)


def test_a_single_text_model_of_named_columns_takes_one_text():
    """--text-cols with one column: a single-text model (a pair test of len >= 1 refused its texts)."""
    spec = tasks.TaskSpec(name="custom", kind="single", labels=["a", "b"], text_cols=["sentence"], max_seq_len=16)
    predict = fastbert.Predictor(tasks.build_model(spec, "default"), spec, fastbert.Tokenizer.from_pretrained("default"))
    assert predict("a film")["label"] in ("a", "b")
    with pytest.raises(ValueError, match="one text per input, not text_pairs"):
        predict("a film", "another")


def test_tagging_words_must_hold_words(saved):
    predict = fastbert.Predictor.from_pretrained(saved["ner"], device="cpu")
    with pytest.raises(TypeError, match="words must be a list of words"):
        predict(words=[])


@pytest.mark.gpu
def test_on_a_gpu_the_predictor_gives_the_cpus_results(saved):
    """The kernels (float32 here: Triton's attention, the span score's kernel for QA) against the CPU's
    torch backend, on each kind of model."""
    inputs = {"sst2": (["a gripping , beautifully acted film", "a tedious mess"],), "stsb": (["A man sings."], ["He sings."]),
              "ner": ("John Smith met Anna Lee in New York on Monday with Peter",)}
    for name, args in inputs.items():
        cpu = fastbert.Predictor.from_pretrained(saved[name], device="cpu")(*args)
        gpu = fastbert.Predictor.from_pretrained(saved[name], device="cuda", precision="fp32")(*args)
        if name == "ner":
            assert gpu["tags"] == cpu["tags"] and gpu["entities"] == cpu["entities"]
        else:
            for a, b in zip(gpu, cpu):
                assert a == pytest.approx(b, abs=1e-4) if name == "stsb" else \
                    (a["label"] == b["label"] and a["scores"] == pytest.approx(b["scores"], abs=1e-4))
    context = "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California. " * 3
    cpu = fastbert.Predictor.from_pretrained(saved["squad"], device="cpu")(question="Where?", context=context)
    gpu = fastbert.Predictor.from_pretrained(saved["squad"], device="cuda", precision="fp32")(question="Where?",
                                                                                               context=context)
    assert (gpu["start"], gpu["end"]) == (cpu["start"], cpu["end"]) and gpu["score"] == pytest.approx(cpu["score"], abs=1e-3)
