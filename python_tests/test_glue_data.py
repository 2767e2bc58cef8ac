"""GLUE TSV readers and metrics of the experiment script (examples/glue_*.py).

The readers are checked on the real files in ../shared/data/glue when that folder exists
(it lives outside the repository for licence reasons) and on small files written here;
the metrics on cases computed by hand, and against scipy where it is installed.
"""
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))

import glue_data  # noqa: E402
import glue_metrics as gm  # noqa: E402

GLUE_DIR = os.environ.get("DPS_GLUE_DIR", os.path.join(REPO, "..", "shared", "data", "glue"))
needs_glue = pytest.mark.skipif(not os.path.isdir(GLUE_DIR),
                                reason=f"GLUE TSV folder not found at {GLUE_DIR} (set DPS_GLUE_DIR)")

# Row counts of the GLUE release (data/README.md); a quoting bug merges rows and changes them.
EXPECTED_ROWS = {("RTE", "train"): 2490, ("RTE", "dev"): 277, ("MRPC", "train"): 3668,
                 ("MRPC", "dev"): 408, ("CoLA", "train"): 8551, ("CoLA", "dev"): 1043,
                 ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500, ("SST-2", "dev"): 872}


@needs_glue
@pytest.mark.parametrize("task,split", sorted(EXPECTED_ROWS))
def test_real_files_row_counts_and_labels(task, split):
    path = os.path.join(GLUE_DIR, task, f"{split}.tsv")
    if not os.path.isfile(path):
        pytest.skip(f"{path} missing")
    ex = glue_data.read_tsv(path, task)
    assert len(ex) == EXPECTED_ROWS[(task, split)]
    spec = glue_data.task_spec(task)
    assert all(e.text_a.strip() for e in ex)
    assert all((e.text_b is None) == (spec.text_b is None) for e in ex)
    if spec.is_regression:
        assert all(0.0 <= e.label <= 5.0 for e in ex)
    else:
        assert {e.label for e in ex} == {0, 1}


@needs_glue
def test_real_files_first_rows():
    """Spot checks against the first data line of each file (read with `head`)."""
    rte = glue_data.read_tsv(os.path.join(GLUE_DIR, "RTE", "dev.tsv"), "RTE")
    assert rte[0].text_b == "Christopher Reeve had an accident." and rte[0].label == 1  # not_entailment
    assert rte[1].label == 0  # entailment
    mrpc = glue_data.read_tsv(os.path.join(GLUE_DIR, "MRPC", "dev.tsv"), "MRPC")
    # The bare quote opening this sentence must stay part of it, not start a quoted field.
    assert mrpc[0].text_b.startswith('"The foodservice pie business') and mrpc[0].label == 1
    assert mrpc[1].label == 0
    cola = glue_data.read_tsv(os.path.join(GLUE_DIR, "CoLA", "dev.tsv"), "CoLA")
    assert cola[0] == glue_data.Example("The sailors rode the breeze clear of the rocks.", None, 1)
    stsb = glue_data.read_tsv(os.path.join(GLUE_DIR, "STS-B", "dev.tsv"), "STS-B")
    assert stsb[1] == glue_data.Example("A young child is riding a horse.", "A child is riding a horse.", 4.75)


def test_reader_keeps_bare_quotes_and_bom(tmp_path):
    d = tmp_path / "MRPC"
    d.mkdir()
    (d / "dev.tsv").write_bytes(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1\t2\tHe said "yes\tShe said no"\n0\t3\t4\tA\tB\n'.encode("utf-8"))
    ex = glue_data.load_split("MRPC", "dev", str(tmp_path))
    assert ex == [glue_data.Example('He said "yes', 'She said no"', 1), glue_data.Example("A", "B", 0)]


def test_reader_rejects_unknown_label_and_short_row(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="maybe"):
        glue_data.load_split("RTE", "dev", str(tmp_path))
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match="3 fields"):
        glue_data.load_split("RTE", "dev", str(tmp_path))


def test_missing_data_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        glue_data.load_split("RTE", "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_data.load_split("MNLI", "train", str(tmp_path))


# ---- metrics, hand-computed -------------------------------------------------------------

def test_accuracy_and_f1():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert gm.accuracy(preds, labels) == 3 / 5
    # TP=2, FP=1, FN=1 -> 2*2 / (4 + 1 + 1)
    assert gm.f1_binary(preds, labels) == 4 / 6
    assert gm.f1_binary([0, 0], [0, 0]) == 0.0
    assert gm.f1_binary([0, 0], [1, 1]) == 0.0


def test_matthews():
    # TP=2, TN=1, FP=1, FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert gm.matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6, abs=1e-15)
    assert gm.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert gm.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert gm.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction


def test_ranks_and_spearman_with_ties():
    assert gm.average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # Monotone but non-linear: Spearman 1, Pearson < 1.
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 4.0, 9.0, 100.0]
    assert gm.spearman(x, y) == pytest.approx(1.0, abs=1e-15)
    assert gm.pearson(x, y) < 0.9
    # Ties, by hand: ranks x=[1,2.5,2.5,4], y=[1,2,3,4]; centred [-1.5,0,0,1.5] and
    # [-1.5,-.5,.5,1.5]: sxy=4.5, sxx=4.5, syy=5 -> 4.5/sqrt(22.5)
    assert gm.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-15)
    assert math.isnan(gm.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="length"):
        gm.spearman([1, 2], [1])


def test_metrics_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats", reason="scipy not installed: hand-computed cases only")
    import random
    rng = random.Random(0)
    x = [rng.choice([0.0, 0.5, 1.0, 2.5, 5.0]) + rng.random() * (i % 3 == 0) for i in range(301)]
    y = [a + rng.gauss(0, 1) for a in x]
    assert gm.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert gm.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


# ---- the experiment script's scoring and summary -------------------------------------------

def test_script_scoring_and_summary(tmp_path):
    torch = pytest.importorskip("torch")
    import glue_dps
    import glue_store
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = glue_dps.score("MRPC", logits, [1, 0, 0, 0])  # preds 1,0,1,0: TP=1, FP=1, FN=0
    assert out == {"accuracy": 0.75, "f1": 2 / 3}
    out = glue_dps.score("STS-B", torch.tensor([[0.5], [1.0], [4.0]]), [1.0, 2.0, 3.0])
    assert out["spearman"] == pytest.approx(1.0)

    store = glue_store.RunStore(str(tmp_path / "runs.jsonl"))
    def add(method, seed, value, lr=1e-4):
        key = glue_store.run_key("RTE", method, seed, lr, 1000, {})
        store.add({"key": key, "task": "RTE", "method": method, "seed": seed, "lr": lr,
                   "subset": 1000, "hparams": {}, "metric": "accuracy", "value": value})
    for seed, v in enumerate((60.0, 64.0, 56.0), start=1):
        add("dense", seed, v)
    add("vanilla", 1, 57.0)
    add("vanilla", 2, 59.0)
    add("vanilla", 1, 40.0, lr=1e-3)      # a worse lr of the search: not the baseline
    reopened = glue_store.RunStore(str(tmp_path / "runs.jsonl"))   # resumable
    assert reopened.done(glue_store.run_key("RTE", "dense", 2, 1e-4, 1000, {}))
    assert not reopened.done(glue_store.run_key("RTE", "dense", 4, 1e-4, 1000, {}))
    summary = {(s["method"], s["lr"]): s for s in glue_store.summarize(reopened.rows)}
    dense = summary[("dense", 1e-4)]
    assert dense["mean"] == 60.0 and dense["std"] == 4.0 and dense["n"] == 3  # sample std
    assert dense["failed"] == 1                  # 56 < vanilla mean 58 at the same lr
    assert summary[("vanilla", 1e-3)]["std"] is None
    table = glue_store.markdown(list(summary.values()), ["vanilla", "dense"], {})
    assert "| dense | - | 60.00 ± 4.00 (n=3, 1 failed; lr 0.0001) |" in table
    assert "| vanilla | - | 58.00 ± 1.41 (n=2, 1 failed; lr 0.0001) |" in table
    assert "| 0.001 | 40.00 ± n/a (n=1, 0 failed) |" in table     # the lr search table
    # the lr choice compares the seeds every lr has (seed 1: 57 vs 40), so it stays put
    assert glue_dps.best_vanilla_lr(reopened, "RTE", 1000) == 1e-4


def test_script_smoke_defaults():
    import glue_dps
    args = glue_dps.parse_args(["--smoke", "--model", "some/model"])
    assert (args.subset, args.max_dev, args.seeds, args.max_steps, args.update_steps) == \
        (64, 64, [1], 4, 1)
    full = glue_dps.parse_args(["--model", "some/model"])  # the paper's recipe
    assert (full.max_len, full.batch_size, full.lrs, full.epochs, full.warmup_ratio,
            full.weight_decay, full.max_grad_norm) == (128, 16, [2e-5], 3.0, 0.1, 0.01, 1.0)
    assert full.tasks == ["RTE", "MRPC", "CoLA", "STS-B"] and full.seeds == [1, 2, 3, 4, 5]


def test_every_table_1_method_has_a_recipe():
    import glue_methods
    table_1 = {"vanilla", "mixout", "r3f", "rdrop", "childtuning_d", "reinit", "dense", "mix"}
    assert table_1 <= set(glue_methods.METHODS)
    assert {"vanilla_nodrop", "dense_dropout"} <= set(glue_methods.METHODS)   # the controls
    assert len(glue_methods.grid("dense")) == 15 and len(glue_methods.grid("mixout")) == 8
    assert not glue_methods.applicable(glue_methods.METHODS["r3f"], regression=True)
