"""fastbert.tasks: TaskSpec fields reach the readers (no model needed)."""
import dataclasses

import pytest

import fastbert
from fastbert import tasks


@pytest.fixture(scope="module")
def tok():
    return fastbert.Tokenizer.from_pretrained("default")


def test_task_spec_header(tmp_path, tok):
    """header=False reads the first row as an example; None keeps each preset's own setting
    (CoLA's files have no header, SST-2's have one) and a header for other data."""
    path = tmp_path / "rows.tsv"
    path.write_text("a fine film\t1\na dull film\t0\nlovely\t1\n")
    custom = dict(name="single", kind="single", text_cols=["0"], label_col="1")
    assert len(tasks.read(tasks.TaskSpec(**custom, header=False), path, tok).features) == 3
    assert len(tasks.read(tasks.TaskSpec(**custom), path, tok).features) == 2
    cola = tmp_path / "cola.tsv"
    cola.write_text("src\t1\t\tIt rains.\nsrc\t0\t*\tRains it the.\n")
    assert tasks.TaskSpec.preset("cola").header is None
    assert len(tasks.read(tasks.TaskSpec.preset("cola"), cola, tok).features) == 2
    sst2 = tmp_path / "sst2.tsv"
    sst2.write_text("sentence\tlabel\na fine film\t1\n")
    assert len(tasks.read(tasks.TaskSpec.preset("sst2"), sst2, tok).features) == 1
    assert tasks.TaskSpec(**{k: v for k, v in custom.items()}).header is None   # an old saved spec: no field


# --- tasks.evaluate: heads' predictions through the metrics, against sklearn/scipy ---------------

import json  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import sklearn.metrics  # noqa: E402
import torch  # noqa: E402

from fastbert import heads, metrics  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)


def _features(n, labels, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 12))
        f = {"input_ids": rng.integers(1, 64, length).tolist(), "token_type_ids": [0] * length}
        f["labels"] = labels(i, length)
        out.append(f)
    return out


def _logits(model, feats):
    return tasks.predict_logits(model, feats, batch_size=4)   # batches cut by length: rows back in order


def test_evaluate_classification_is_sklearn_on_the_predictions():
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**TINY), num_labels=2)
    spec = tasks.TaskSpec(name="x", kind="single", labels=["no", "yes"])
    feats = _features(11, lambda i, n: i % 2)
    preds = torch.stack(_logits(model, feats)).argmax(-1).numpy()
    gold = [f["labels"] for f in feats]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # sklearn warns where MCC or F1 is undefined
        expected = {"accuracy": sklearn.metrics.accuracy_score(gold, preds),
                    "f1": sklearn.metrics.f1_score(gold, preds, zero_division=0),
                    "matthews": sklearn.metrics.matthews_corrcoef(gold, preds)}
    assert tasks.evaluate(model, spec, tasks.TaskData(feats), batch_size=4) == pytest.approx(expected, abs=1e-12)
    one = tasks.evaluate(model, spec, tasks.TaskData(feats[:1]))             # a single example
    assert one["accuracy"] in (0.0, 1.0) and one["matthews"] == 0.0


def test_evaluate_regression_constant_predictions_are_null_as_scipy_nan():
    """A collapsed regression model predicts one value for every input: Pearson and Spearman are
    undefined (scipy: NaN), written as null in the metrics JSON."""
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**TINY), num_labels=1)
    spec = tasks.TaskSpec(name="x", kind="regression")
    feats = _features(9, lambda i, n: float(i % 5) * 1.2)
    preds = torch.stack(_logits(model, feats)).squeeze(-1).numpy().astype(np.float64)
    gold = [f["labels"] for f in feats]
    # the batching _logits uses: other padding moved these near-constant predictions by 1e-9 on one
    # CPU (their std is 0.0045), and Pearson by 1.5e-8
    scores = tasks.evaluate(model, spec, tasks.TaskData(feats), batch_size=4)
    assert scores["pearson"] == pytest.approx(scipy.stats.pearsonr(preds, gold)[0], abs=1e-9)
    assert scores["spearman"] == pytest.approx(scipy.stats.spearmanr(preds, gold)[0], abs=1e-9)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(2.7)
    scores = tasks.evaluate(model, spec, tasks.TaskData(feats))
    assert math.isnan(scores["pearson"]) and math.isnan(scores["spearman"])
    assert json.loads(metrics.to_json(scores)) == {"pearson": None, "spearman": None}
    constant_gold = [dict(f, labels=0.2) for f in feats]                     # mean of 0.2s is not 0.2
    assert json.loads(metrics.to_json(tasks.evaluate(model, spec, tasks.TaskData(constant_gold)))) == \
        {"pearson": None, "spearman": None}


def test_evaluate_tagging_scores_first_subwords_only():
    torch.manual_seed(0)
    model = heads.BertForTokenClassification(fastbert.BertConfig(**TINY), num_labels=4)
    spec = tasks.TaskSpec(name="x", kind="tagging", labels=["A", "B", "C", "D"])
    feats = _features(7, lambda i, n: [-100] + [(i + j) % 4 if j % 3 else -100 for j in range(1, n - 1)] + [-100])
    preds = torch.cat([l.argmax(-1) for l in _logits(model, feats)]).numpy()
    gold = np.array([x for f in feats for x in f["labels"]])
    keep = gold != -100
    expected = sklearn.metrics.accuracy_score(gold[keep], preds[keep])
    assert tasks.evaluate(model, spec, tasks.TaskData(feats)) == {"token_accuracy": pytest.approx(expected)}


def test_evaluate_an_empty_dev_set_says_so():
    """torch.stack's "expects a non-empty TensorList" (classification), max()'s "empty sequence" (QA)
    came out of a library call on no features; the CLI checks --dev itself (cli._check_dev)."""
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**TINY), num_labels=2)
    for kind in ("single", "regression", "tagging", "qa"):
        with pytest.raises(ValueError, match="no dev features to evaluate"):
            tasks.evaluate(model, tasks.TaskSpec(name="x", kind=kind, labels=["a", "b"]), tasks.TaskData([]))


def test_evaluate_qa_is_the_official_score_of_its_answers(tok):
    from fastbert.data import SquadExample, build_squad_features

    context = "The Denver Broncos beat the Carolina Panthers in Super Bowl 50 at Levi's Stadium in Santa Clara."
    examples = [SquadExample("q1", "t", "Who won?", context, ["Denver Broncos", "The Denver Broncos"], [4, 0]),
                SquadExample("q2", "t", "Where was it?", context, ["Levi's Stadium"], [66])]
    feats = build_squad_features(examples, tok, max_length=32, stride=8, max_question_tokens=8)
    torch.manual_seed(0)
    model = heads.BertForQuestionAnswering(fastbert.BertConfig(**dict(TINY, vocab_size=tok.vocab_size)))
    spec = tasks.TaskSpec(name="qa", kind="qa", max_seq_len=32, doc_stride=8, max_question_len=8)
    dev = tasks.TaskData(feats, examples)
    answers = tasks.answers_from_logits(model, spec, examples, feats, _logits(model, feats))
    assert set(answers) == {"q1", "q2"}
    scores = tasks.evaluate(model, spec, dev)
    em = [max(float(metrics.normalize_answer(answers[e.id]) == metrics.normalize_answer(g)) for g in e.answers)
          for e in examples]
    assert scores["exact_match"] == pytest.approx(100 * sum(em) / 2)
    assert scores == metrics.squad_scores(answers, {e.id: e.answers for e in examples})


# --- what the evaluate tests above cannot see: both sides of their comparisons share the code --------

def test_glue_presets_kind_follows_their_columns():
    """A preset's kind says how `fastbert predict` reads inputs (a pair model takes text<TAB>text_b):
    it must agree with the GLUE preset's columns (two text columns: pair; no label list: regression)."""
    from fastbert import data

    for name, task in data.TASKS.items():
        kind = "regression" if task.is_regression else ("pair" if len(task.text_cols) == 2 else "single")
        assert tasks.TaskSpec.preset(name).kind == kind, name
        assert tasks.TaskSpec.preset(name).labels == (None if task.labels is None else list(task.labels)), name


def test_custom_tsv_dev_labels_use_the_training_label_ids(tmp_path, tok):
    """A custom TSV task discovers its labels in the training file; the dev file is read with that list.
    Rediscovered there, a dev file holding only 'pos' rows would get ['pos'] and score every 'pos' as
    id 0 ('neg')."""
    train = tmp_path / "train.tsv"
    train.write_text("text\tgold\na fine film\tpos\na dull film\tneg\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tgold\nlovely\tpos\ngreat\tpos\n")
    spec = tasks.TaskSpec(name="custom", kind="single", text_cols=["text"], label_col="gold")
    assert [f["labels"] for f in tasks.read(spec, train, tok).features] == [1, 0]
    assert spec.labels == ["neg", "pos"]
    assert [f["labels"] for f in tasks.read(spec, dev, tok).features] == [1, 1]
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tgold\nmeh\tneutral\n")
    with pytest.raises(fastbert.data.DataFormatError, match=r"bad\.tsv:2: label 'neutral' is not one of"):
        tasks.read(spec, bad, tok)


def test_custom_tsv_regression_reads_scores(tmp_path, tok):
    """A custom (non-GLUE) regression task: float labels, no label list (read as classes, the scores
    would become class ids 0, 1, 2 of their sorted order)."""
    path = tmp_path / "scores.tsv"
    path.write_text("a fine film\t4.5\na dull film\t0.5\nok\t2\n")
    spec = tasks.TaskSpec(name="custom", kind="regression", text_cols=["0"], label_col="1", header=False)
    assert [f["labels"] for f in tasks.read(spec, path, tok).features] == [4.5, 0.5, 2.0]
    assert spec.labels is None


def test_predict_logits_rows_are_each_features_own():
    """predict_logits batches features sorted by length; each result must be the model's output on that
    feature alone (the evaluate tests compare predict_logits with itself, so rows put back in batch
    order instead of feature order would pass them)."""
    torch.manual_seed(0)
    feats = _features(10, lambda i, n: [0] * n, seed=3)
    assert len({len(f["input_ids"]) for f in feats}) > 3  # lengths differ: the sort moves rows
    for model in (heads.BertForSequenceClassification(fastbert.BertConfig(**TINY), num_labels=3),
                  heads.BertForTokenClassification(fastbert.BertConfig(**TINY), num_labels=4)):
        model.eval()
        got = tasks.predict_logits(model, feats, batch_size=4)
        for f, logits in zip(feats, got):
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([f["input_ids"]]),
                              token_type_ids=torch.tensor([f["token_type_ids"]])).logits[0]
            assert logits.shape == alone.shape and torch.allclose(logits, alone, atol=1e-5)


def test_answers_from_logits_reads_start_then_end(tok):
    """predict_logits gives a QA feature (seqlen, 2) logits: column 0 start, column 1 end (the
    BertForQuestionAnswering / transformers layout). Peaks at 'Denver' (start) and 'Broncos' (end)
    give 'Denver Broncos'."""
    from fastbert.data import SquadExample, build_squad_features

    context = "The Denver Broncos beat the Carolina Panthers in Super Bowl 50 at Levi's Stadium in Santa Clara."
    examples = [SquadExample("q1", "t", "Who won?", context, ["Denver Broncos"], [4])]
    feats = build_squad_features(examples, tok, max_length=64, stride=8, max_question_tokens=8)
    f = feats[0]
    denver = next(t for t, o in enumerate(f["offsets"]) if f["context_mask"][t] and o[0] == 4)
    broncos = next(t for t, o in enumerate(f["offsets"]) if f["context_mask"][t] and o[1] == 18)
    assert denver < broncos
    logits = [torch.zeros(len(g["input_ids"]), 2) for g in feats]
    logits[0][denver, 0] = logits[0][broncos, 1] = 10.0
    model = torch.nn.Linear(1, 1)  # only its device is read
    spec = tasks.TaskSpec(name="qa", kind="qa", max_seq_len=64, doc_stride=8, max_question_len=8)
    assert tasks.answers_from_logits(model, spec, examples, feats, logits) == {"q1": "Denver Broncos"}


def test_evaluate_multiclass_reports_accuracy_only():
    """F1 and Matthews here are the binary ones (positive class 1): a 3-class task reports accuracy."""
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**TINY), num_labels=3)
    spec = tasks.TaskSpec(name="x", kind="single", labels=["a", "b", "c"])
    feats = _features(12, lambda i, n: i % 3)
    preds = torch.stack(_logits(model, feats)).argmax(-1).numpy()
    expected = sklearn.metrics.accuracy_score([f["labels"] for f in feats], preds)
    assert tasks.evaluate(model, spec, tasks.TaskData(feats)) == {"accuracy": pytest.approx(expected)}


def test_a_saved_task_spec_this_version_does_not_know_is_named(tmp_path):
    """An unknown fastbert_task field (a newer fastbert's, an edited file) ended predict/evaluate in a
    TypeError traceback."""
    spec = tasks.TaskSpec(name="x", kind="single", labels=["no", "yes"])
    tasks.build_model(spec, "default").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert tasks.load_finetuned(tmp_path)[1] == spec
    for task, message in (({**config["fastbert_task"], "new_field": 1}, r"fields \['new_field'\] this fastbert does not know"),
                          ("single", "holds a str this fastbert does not know"),
                          ({"name": "x"}, "fastbert_task is incomplete")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "fastbert_task": task}))
        with pytest.raises(ValueError, match=message):
            tasks.load_finetuned(tmp_path)


def test_evaluate_ner_scores_words_and_counts_an_untokenizable_word_as_o(tok):
    """IOB tags: entity scores over the file's words (gold from the sentences, predictions from each
    word's first piece, a long sentence tagged in pieces); a zero-width space has no piece, so its
    gold B-PER is a missed entity, never a crash or a skipped word."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    from fastbert.data.tagging import TaggedSentence

    torch.manual_seed(0)
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG"]
    spec = tasks.TaskSpec(name="x", kind="tagging", labels=labels, max_seq_len=12)
    model = heads.BertForTokenClassification(fastbert.BertConfig(**dict(TINY, vocab_size=tok.vocab_size)),
                                             num_labels=len(labels))
    rng = np.random.default_rng(0)
    words = "the mayor of new york met anna lee in paris on monday".split()
    sentences = [TaggedSentence(list(words), [labels[i] for i in rng.integers(0, 5, len(words))], 1),   # no ORG
                 TaggedSentence(["hello", "\u200b", "world"], ["O", "B-PER", "O"], 14)]
    dev = tasks.TaskData(fastbert.data.encode_tagging(sentences, tok, labels, spec.max_seq_len), sentences)
    assert len(dev.features) > len(sentences)                          # the first sentence is in pieces
    scores, predicted = tasks.evaluate_and_predict(model, spec, dev, batch_size=2)
    assert predicted[1][1] is None and all(t is not None for s in predicted for t in s if s is not predicted[1])
    pred = [[t or "O" for t in s] for s in predicted]
    gold = [s.tags for s in sentences]
    assert tasks.metric_names(spec) == ("entity_f1", "entity_precision", "entity_recall", "token_accuracy",
                                        "entity_f1_LOC", "entity_f1_ORG", "entity_f1_PER", "entity_precision_LOC",
                                        "entity_precision_ORG", "entity_precision_PER", "entity_recall_LOC",
                                        "entity_recall_ORG", "entity_recall_PER")
    assert (scores["entity_f1"], scores["entity_precision"], scores["entity_recall"]) == (
        f1_score(gold, pred), precision_score(gold, pred), recall_score(gold, pred))
    assert tasks.evaluate(model, spec, dev, batch_size=3) == scores
    assert scores["entity_recall"] < 1 and set(scores) == set(tasks.metric_names(spec))
    from seqeval.metrics import classification_report   # per type: seqeval's report (ORG: neither side has one)

    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    for kind in ("LOC", "PER"):
        assert [scores[f"entity_{k}_{kind}"] for k in ("precision", "recall", "f1")] == \
            [report[kind][k] for k in ("precision", "recall", "f1-score")], kind
    assert "ORG" not in report and all(math.isnan(scores[f"entity_{k}_ORG"]) for k in ("precision", "recall", "f1"))
    with torch.no_grad():                                           # every word O: a type nobody tagged has no score
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0]))
    nothing = tasks.evaluate(model, spec, dev)
    assert nothing["entity_f1"] == nothing["entity_f1_PER"] == nothing["entity_f1_LOC"] == 0.0
    assert math.isnan(nothing["entity_f1_ORG"]) and json.loads(metrics.to_json(nothing))["entity_f1_ORG"] is None
    with pytest.raises(ValueError, match="dev.examples must hold the tagged sentences"):
        tasks.evaluate(model, spec, tasks.TaskData(dev.features))
    upos = tasks.TaskSpec(name="pos", kind="tagging", labels=["NOUN", "VERB"])
    assert tasks.metric_names(upos) == ("token_accuracy",)


def test_the_ner_preset_has_the_conll2003_dataset_ids():
    """The label order of Hugging Face's `conll2003` dataset, so data stored as its integer ids maps."""
    assert tasks.TaskSpec.preset("ner").labels == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC",
                                                   "B-MISC", "I-MISC"]
    assert tasks.metric_names(tasks.TaskSpec.preset("ner"))[0] == "entity_f1"


def test_a_tagging_task_of_iob1_entities_takes_each_prefix_for_each_type(tmp_path, tok):
    """An IOB1 training file (CoNLL-2003's) uses B- only between two entities of one type: here never
    for LOC. Its dev file's B-LOC was "not in labels" (a user's --max-train-examples cut hits it)."""
    train = tmp_path / "train.txt"
    train.write_text("John NNP B-NP I-PER\nlives VBZ B-VP O\nin IN B-PP O\nParis NNP B-NP I-LOC\n\n"
                     "Anna NNP B-NP I-PER\nMaria NNP B-NP B-PER\n\n")
    dev = tmp_path / "dev.txt"
    dev.write_text("Berlin NNP B-NP I-LOC\nBonn NNP B-NP B-LOC\n\n")
    spec = tasks.TaskSpec(name="tagging", kind="tagging")
    tasks.read(spec, train, tok)
    assert spec.labels == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    assert len(tasks.read(spec, dev, tok).features) == 1
    only_i = tmp_path / "only_i.txt"                              # no B- at all, as most IOB1 slices
    only_i.write_text("John NNP B-NP I-PER\nParis NNP B-NP I-LOC\n\n")
    spec = tasks.TaskSpec(name="tagging", kind="tagging")
    tasks.read(spec, only_i, tok)
    assert spec.labels == ["B-LOC", "B-PER", "I-LOC", "I-PER"]
    assert metrics.complete_chunk_tags(["O", "S-PER", "B-LOC", "E-LOC"]) == [
        "B-LOC", "B-PER", "E-LOC", "E-PER", "I-LOC", "I-PER", "O", "S-LOC", "S-PER"]
    pos = tasks.TaskSpec(name="tagging", kind="tagging")
    upos = tmp_path / "upos.txt"
    upos.write_text("The DT B-NP DET\ndog NN I-NP NOUN\n\n")
    tasks.read(pos, upos, tok)
    assert pos.labels == ["DET", "NOUN"]                         # no chunk scheme: the file's tags only


# --- SQuAD v2.0: questions without an answer ------------------------------------------------------

def _squad_json(path, qas, context="The cat sat on the mat."):
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


ANSWERED = {"id": "a", "question": "Who sat?", "answers": [{"text": "cat", "answer_start": 4}]}
UNANSWERED = {"id": "n", "question": "Who flew?", "answers": [], "is_impossible": True}


def test_squad_v2_is_a_preset_and_read_from_a_custom_qa_training_file(tmp_path, tok):
    v1, v2 = tasks.TaskSpec.preset("squad"), tasks.TaskSpec.preset("squad_v2")
    assert (v1.kind, v1.no_answer, v2.kind, v2.no_answer) == ("qa", False, "qa", True)
    assert tasks.metric_names(v1) == ("f1", "exact_match")
    assert tasks.metric_names(v2)[:2] == ("f1", "exact_match") and "best_f1_threshold" in tasks.metric_names(v2)
    both = _squad_json(tmp_path / "v2.json", [ANSWERED, UNANSWERED])
    only = _squad_json(tmp_path / "v1.json", [ANSWERED])
    with pytest.raises(fastbert.data.DataFormatError, match=r"v2\.json: 1 of 2 questions have no answer \(SQuAD "
                                                           r"v2\.0\), and task 'squad' answers every question "
                                                           r"\(SQuAD v1\.1, .*fine-tune with --task squad_v2"):
        tasks.read(tasks.TaskSpec.preset("squad", max_seq_len=32, max_question_len=8), both, tok)
    assert len(tasks.read(tasks.TaskSpec.preset("squad_v2", max_seq_len=32, max_question_len=8, doc_stride=8), both, tok).features) == 2
    custom = tasks.TaskSpec(name="qa", kind="qa", max_seq_len=32, max_question_len=8, doc_stride=8)
    tasks.read(custom, only, tok)
    assert custom.no_answer is False      # the training file decides, once: a dev file cannot change it
    with pytest.raises(fastbert.data.DataFormatError, match="1 of 2 questions have no answer"):
        tasks.read(custom, both, tok)
    custom = tasks.TaskSpec(name="qa", kind="qa", max_seq_len=32, max_question_len=8, doc_stride=8)
    tasks.read(custom, both, tok)
    assert custom.no_answer is True
    tasks.read(custom, only, tok)          # a v2.0 model may be scored on questions that all have answers


def test_a_qa_spec_saved_before_squad_v2_always_answers(tmp_path):
    """v2.0's fields are saved by v2.0 models only: an older fastbert, which refuses fields it does not
    know, still loads every other model; and a spec without them loads as SQuAD v1.1."""
    for name in ("squad_v2", "sst2"):
        tasks.build_model(tasks.TaskSpec.preset(name, max_seq_len=64), "default").save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())["fastbert_task"]
        assert ("no_answer" in saved, "null_score_diff_threshold" in saved) == ((name == "squad_v2"),) * 2
    assert tasks.load_finetuned(tmp_path / "squad_v2")[1].no_answer is True
    spec = tasks.TaskSpec.preset("squad", max_seq_len=64)
    tasks.build_model(spec, "default").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in config["fastbert_task"].items() if k not in ("no_answer", "null_score_diff_threshold")}
    (tmp_path / "config.json").write_text(json.dumps({**config, "fastbert_task": {**old, "name": "qa"}}))
    loaded = tasks.load_finetuned(tmp_path)[1]
    assert (loaded.no_answer, loaded.null_score_diff_threshold) == (False, 0.0)


def test_evaluate_squad_v2_scores_spans_and_odds_officially(tok):
    """A v2.0 task is scored by the official v2.0 rules over every question's best span and its
    no-answer odds, at the spec's threshold; the answers it returns are those the threshold makes."""
    from fastbert.data import SquadExample, build_squad_features

    context = "The Denver Broncos beat the Carolina Panthers in Super Bowl 50 at Levi's Stadium in Santa Clara."
    examples = [SquadExample("q1", "t", "Who won?", context, ["Denver Broncos"], [4]),
                SquadExample("q2", "t", "Who sang?", context, [], []),
                SquadExample("q3", "t", "Where was it?", context, ["Levi's Stadium"], [66])]
    feats = build_squad_features(examples, tok, max_length=32, stride=8, max_question_tokens=8)
    torch.manual_seed(0)
    model = heads.BertForQuestionAnswering(fastbert.BertConfig(**dict(TINY, vocab_size=tok.vocab_size)))
    logits = _logits(model, feats)
    for threshold in (-1e9, 0.0, 1e9):
        spec = tasks.TaskSpec(name="qa", kind="qa", max_seq_len=32, doc_stride=8, max_question_len=8, no_answer=True,
                              null_score_diff_threshold=threshold)
        scores, answers = tasks.evaluate_and_predict(model, spec, tasks.TaskData(feats, examples))
        spans, odds = tasks.answers_from_logits(model, spec, examples, feats, logits,
                                                null_score_diff_threshold=math.inf, return_null_odds=True)
        assert all(spans.values()) and answers == {q: "" if odds[q] > threshold else a for q, a in spans.items()}
        gold = {e.id: e.answers for e in examples}
        assert scores == metrics.squad_v2_scores(spans, gold, odds, threshold)
        # the threshold is applied as if the answers were scored as they are
        assert {k: scores[k] for k in ("exact_match", "f1")} == pytest.approx(
            {k: v for k, v in metrics.squad_v2_scores(answers, gold).items() if k in ("exact_match", "f1")})
        assert answers == tasks.answers_from_logits(model, spec, examples, feats, logits)
        assert tasks.evaluate_and_predict(model, spec, tasks.TaskData(feats, examples), return_null_odds=True) == \
            (scores, answers, odds)
    assert "" not in answers.values()                                                   # 1e9: always a span
    # odds equal to the threshold answer the span: "" only above it (run_qa's score_diff > threshold)
    at_q1 = dataclasses.replace(spec, null_score_diff_threshold=odds["q1"])
    assert tasks.evaluate_and_predict(model, at_q1, tasks.TaskData(feats, examples))[1]["q1"] == spans["q1"]
    below = dataclasses.replace(spec, null_score_diff_threshold=math.nextafter(odds["q1"], -math.inf))
    assert tasks.evaluate_and_predict(model, below, tasks.TaskData(feats, examples))[1]["q1"] == ""
    with torch.no_grad():                     # a diverged model: every score undefined (null), not a crash
        model.qa_outputs.bias.fill_(float("nan"))
    diverged = tasks.evaluate(model, spec, tasks.TaskData(feats, examples))
    assert set(diverged) == set(tasks.metric_names(spec)) and all(math.isnan(v) for v in diverged.values())
    odds = tasks.evaluate_and_predict(model, spec, tasks.TaskData(feats, examples), return_null_odds=True)[2]
    assert set(odds) == {"q1", "q2", "q3"} and all(math.isnan(v) for v in odds.values())
    with pytest.raises(ValueError, match="return_null_odds is for SQuAD v2.0 tasks .*not task 'squad'"):
        tasks.evaluate_and_predict(model, tasks.TaskSpec.preset("squad"), tasks.TaskData(feats, examples), return_null_odds=True)
    assert set(scores) == set(tasks.metric_names(spec))
