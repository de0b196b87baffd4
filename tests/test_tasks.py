"""Offline lm-eval tasks: loaders (row counts of shared/data/SOURCES.md, schemas, labels), the
foundry -> harness-schema reconstructions, agreement with lm-eval's own builtin task configs
(same prompts, same requests, same scores on the bundled model), GSM8K answer extraction, the
HumanEval sandbox, and one end-to-end ``run_tasks`` call."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeq.calib.sources import data_root
from moeq.evaluate import lm_eval as ME
from moeq.evaluate.tasks import TASKS, available_tasks, load_yaml, loaders, task_configs
from moeq.evaluate.tasks import gsm8k as G
from moeq.evaluate.tasks import humaneval as HE
from moeq.evaluate.tasks import prompts

ROOT = data_root()
# rows per task, from shared/data/SOURCES.md
COUNTS = {"hellaswag": 10042, "piqa": 1838, "boolq": 3270, "copa": 100, "openbookqa": 500, "winogrande": 1267,
          "arc_easy": 2376, "arc_challenge": 1172, "mathqa": 2985, "gsm8k": 1319, "humaneval": 164, "lambada": 5153}
N_CHOICES = {"openbookqa": 4, "arc_easy": 4, "arc_challenge": 4, "hellaswag": 4, "mathqa": 5}


def _foundry(name: str) -> list[dict]:
    with open(ROOT / loaders.FILES[name][0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the 11M-parameter model gains nothing from two, and on the shared 2-core CI
    machine two threads contend with other jobs (generation measured 4-40x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm_mod():
    with ME.offline():
        return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def bundled():
    from moeq.models.loading import load_model

    return load_model("qwen2-moe-tiny")


@pytest.fixture(scope="module")
def hflm(lm_mod, bundled):
    from lm_eval.models.huggingface import HFLM

    with ME._quiet_env():
        return HFLM(pretrained=bundled.model, tokenizer=bundled.tokenizer, batch_size=8)


# --------------------------------------------------------------------------- loaders
def test_data_and_task_list():
    assert ROOT is not None, "../shared/data must be found next to the repository"
    assert available_tasks() == list(TASKS) and len(TASKS) == 13
    for name in TASKS:
        assert load_yaml(name)["task"] == name


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_counts_and_labels(name):
    docs = loaders.load_docs(name)["test"]
    assert len(docs) == COUNTS[name]
    for d in docs[:50] + docs[-50:]:
        if name == "piqa":
            assert d["label"] in (0, 1) and d["goal"] and d["sol1"] is not None
        elif name == "hellaswag":
            assert len(d["endings"]) == N_CHOICES[name] and d["label"] in "0123" and d["activity_label"] and d["ctx_a"]
        elif name == "boolq":
            assert d["label"] in (0, 1) and d["passage"] and not d["question"].endswith("?")
        elif name == "copa":
            assert d["label"] in (0, 1) and d["question"] in ("cause", "effect") and d["premise"].endswith(".")
        elif name in ("openbookqa", "arc_easy", "arc_challenge"):
            assert len(d["choices"]["text"]) == N_CHOICES[name] and d["answerKey"] in d["choices"]["label"]
        elif name == "winogrande":
            assert d["answer"] in ("1", "2") and d["sentence"].count("_") >= 1 and d["option1"] and d["option2"]
        elif name == "mathqa":
            assert d["correct"] in "abcde" and len(prompts.mathqa_doc_to_choice(d)) == N_CHOICES[name]
        elif name == "gsm8k":
            assert G.gold_answer(d["answer"]).lstrip("-").replace(",", "").isdigit()
        elif name == "humaneval":
            assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(d)
        elif name == "lambada":
            assert " " in d["text"]


def test_mmlu_loader():
    subjects = loaders.mmlu_subjects()
    assert len(subjects) == 57
    test = [d for s in subjects for d in loaders.load_mmlu(s)]
    dev = [d for s in subjects for d in loaders.load_mmlu(s, "dev")]
    assert (len(test), len(dev)) == (14042, 285)
    assert all(len(d["choices"]) == 4 and d["answer"] in range(4) for d in test)
    cfgs = task_configs("mmlu")
    assert len(cfgs) == 57 and cfgs[0]["num_fewshot"] == 5
    assert cfgs[0]["description"] == ("The following are multiple choice questions (with answers) about "
                                      "abstract algebra.\n\n")


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEQ_DATA_DIR", raising=False)
    with pytest.raises(loaders.TaskDataNotFoundError) as e:
        task_configs("piqa", data_dir=tmp_path)
    assert "piqa/valid.jsonl" in str(e.value) and "MOEQ_DATA_DIR" in str(e.value)
    with pytest.raises(ValueError, match="available: .*piqa"):
        ME.run_tasks(None, None, ["piqa", "no_such_task"])
    with pytest.raises(ValueError, match="no_such_task"):
        ME.run_tasks(None, None, ["piqa"], num_fewshot={"no_such_task": 1})


# --------------------------------------------------------------------------- foundry reconstructions
def test_foundry_reconstructions_rebuild_the_same_text(lm_mod):
    """moeq prompts from the reconstructed docs equal the text LLM-Foundry stored (modulo its layout)."""
    for name in ("arc_easy", "openbookqa", "boolq", "copa", "winogrande", "lambada"):
        task = ME.build_task(name)[0]
        raw = _foundry(name)
        for d, r in zip(list(task.eval_docs)[:40], raw[:40]):
            ctx, target = task.fewshot_context(d, 0), task.doc_to_target(d)
            if name == "arc_easy":
                assert ctx == r["query"] + "\nAnswer:" and task.doc_to_choice(d) == r["choices"]
            elif name == "openbookqa":
                assert ctx == r["query"] and task.doc_to_choice(d) == r["choices"]
            elif name == "boolq":
                assert ctx == r["query"].removeprefix("Passage: ") + "\nAnswer:"
            elif name == "copa":  # foundry adds a comma before the connector; the harness does not
                stem, _, conn = r["query"].rpartition(", ")
                assert ctx == f"{stem} {conn}" and task.doc_to_choice(d) == [" " + c for c in r["choices"]]
                assert target == " " + r["choices"][r["gold"]]
            elif name == "winogrande":
                assert ctx == r["context_options"] and target == r["continuation"]
                assert task.doc_to_text(d) == r["gold"]
            elif name == "lambada":
                assert (ctx, target) == (r["context"], " " + r["continuation"])
            if name in ("arc_easy", "openbookqa", "boolq"):
                assert target == r["gold"]


# --------------------------------------------------------------------------- agreement with the harness
BUILTIN = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
           "hellaswag": "hellaswag/hellaswag.yaml", "copa": "super_glue/copa/default.yaml",
           "boolq": "super_glue/boolq/default.yaml", "winogrande": "winogrande/default.yaml",
           "openbookqa": "openbookqa/openbookqa.yaml", "mathqa": "mathqa/mathqa.yaml",
           "lambada": "lambada/lambada_openai.yaml"}


def _harness_task(rel: str, name: str, splits: dict[str, list[dict]]):
    """lm-eval's own builtin config, with its hub dataset replaced by the same local documents."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml as harness_yaml

    cfg = harness_yaml(Path(lm_eval.__file__).parent / "tasks" / rel)
    for key in ("dataset_path", "dataset_name", "tag"):
        cfg.pop(key, None)
    names = {cfg.get(f"{s}_split") for s in ("training", "validation", "test", "fewshot")} - {None}
    data = {n: datasets.Dataset.from_list(splits.get(n, splits["test"])) for n in names}
    cfg.update(task=f"harness_{name}", custom_dataset=lambda **_: data)
    with ME.offline():
        return ConfigurableTask(config=cfg)


def _requests(task, doc, ctx):
    reqs = task.construct_requests(doc, ctx, metadata=(task.task_name, 0, 1))
    return [r.arguments for r in (reqs if isinstance(reqs, list) else [reqs])]


@pytest.mark.slow
def test_scores_match_harness_builtin_tasks(lm_mod, hflm):
    from lm_eval.tasks import TaskManager

    k, pairs = 4, {}
    for name, rel in BUILTIN.items():
        ours = ME.build_task(name, tokenizer=hflm.tokenizer, max_length=hflm.max_length)[0]
        theirs = _harness_task(rel, name, loaders.load_docs(name))
        for d1, d2 in zip(list(ours.eval_docs)[:k], list(theirs.eval_docs)[:k]):
            c1 = ours.fewshot_context(d1, 0)
            assert c1 == theirs.fewshot_context(d2, 0), name
            assert _requests(ours, d1, c1) == _requests(theirs, d2, c1), name
        pairs[name] = (ours, theirs)
    with ME._quiet_env():
        out = lm_mod.simple_evaluate(model=hflm, tasks=[t for p in pairs.values() for t in p], limit=k,
                                     task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    for name in pairs:
        ours = {m: v for m, v in out["results"][name].items() if "," in m}
        theirs = {m: v for m, v in out["results"][f"harness_{name}"].items() if "," in m}
        assert ours == theirs and ("acc,none" in ours), name
        if name in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "openbookqa", "mathqa"):
            assert "acc_norm,none" in ours
    assert "perplexity,none" in out["results"]["lambada"]


def test_mmlu_five_shot_prompt_matches_harness(lm_mod):
    ours = next(t for t in ME.build_task("mmlu") if t.task_name == "mmlu_anatomy")
    docs = loaders.load_docs("mmlu", subject="anatomy")
    theirs = _harness_task("mmlu/default/mmlu_anatomy.yaml", "mmlu_anatomy", docs)
    for d1, d2 in zip(list(ours.eval_docs)[:3], list(theirs.eval_docs)[:3]):
        ctx = ours.fewshot_context(d1, 5)
        assert ctx == theirs.fewshot_context(d2, 5)
        assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
        assert ctx.count("\nAnswer:") == 6


def test_gsm8k_exemplars_are_the_harness_cot_ones(lm_mod):
    from lm_eval.tasks._yaml_loader import load_yaml as harness_yaml

    ref = harness_yaml(Path(lm_mod.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot.yaml")
    assert load_yaml("gsm8k")["fewshot_config"]["samples"] == ref["fewshot_config"]["samples"]


def test_fewshot_prompts_fit_the_context(lm_mod, tokenizer):
    """Shots are dropped (last first) until prompt + generation budget fit; none dropped when roomy."""
    small = ME.build_task("gsm8k", tokenizer=tokenizer, max_length=512)[0]
    assert small.config.generation_kwargs["max_gen_toks"] == 256  # min(256, 512 // 2)
    doc = small.eval_docs[0]
    ctx = small.fewshot_context(doc, 8)
    n = small.moeq_shots[-1]
    assert 0 < n < 8 and ctx.count("Question:") == n + 1
    assert len(tokenizer(ctx, add_special_tokens=False)["input_ids"]) <= 512 - 256
    assert ctx == ME.build_task("gsm8k")[0].fewshot_context(doc, n)  # = the harness prompt with n shots
    big = ME.build_task("gsm8k", tokenizer=tokenizer, max_length=1 << 16)[0]
    assert big.fewshot_context(doc, 8).count("Question:") == 9 and big.moeq_shots == [8]
    he = ME.build_task("humaneval", max_length=512)[0]
    assert he.config.generation_kwargs["max_gen_toks"] == 256  # 1024 capped at half the context


# --------------------------------------------------------------------------- gsm8k / humaneval
def test_gsm8k_answer_extraction(lm_mod):
    assert G.gold_answer("so 3 + 4 = <<3+4=7>>7\n#### 1,234") == "1,234"
    assert G.extract_answer("5 * 4 = 20. 9 + 20 is 29. The answer is 29.\n") == "29"
    assert G.extract_answer("The answer is -3.5. Then The answer is 7.") == "-3.5."
    assert G.extract_answer("no final sentence, 12 then 14") == G.INVALID
    assert G.extract_answer("no final sentence, 12 then 14", strict=False) == "14"
    assert G.extract_answer("costs $1,200 in total", strict=False) == "$1,200"
    assert G.strict_filter([["The answer is 8."], ["nothing"]], [{}, {}]) == [["8"], [G.INVALID]]
    # exact_match with the task's settings: "," "$" trailing "." ignored
    from lm_eval.api.metrics import exact_match_hf_evaluate

    kw = {k: v for k, v in load_yaml("gsm8k")["metric_list"][0].items() if k in ("ignore_case", "ignore_punctuation",
                                                                              "regexes_to_ignore")}
    score = exact_match_hf_evaluate(predictions=["1,234.", "$18", "17"], references=["1234", "18", "18"], **kw)
    assert score["exact_match"] == pytest.approx(2 / 3)


def test_humaneval_sandbox():
    docs = loaders.load_humaneval()
    for d in docs[:3]:
        assert HE.check_completion(d, d["canonical_solution"])
    assert not HE.check_completion(docs[0], "    return not True\n")
    assert not HE.check_completion(docs[0], "    return (\n")  # syntax error
    ok, status = HE.run_program("while True:\n    pass\n", timeout=1.0)
    assert (ok, status) == (False, "timed out")
    assert HE.process_results(docs[1], [docs[1]["canonical_solution"]]) == {"pass@1": 1.0}


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_tasks_end_to_end(lm_mod, bundled):
    res = ME.run_tasks(bundled.model, bundled.tokenizer, ["copa", "lambada", "gsm8k"], limit=2)
    assert set(res) == {"copa", "lambada", "gsm8k"}
    assert all(isinstance(v, float) or isinstance(v, int) for r in res.values() for v in r.values())
    assert 0.0 <= res["copa"]["acc"] <= 1.0 and res["copa"]["n_samples"] == 2
    assert res["lambada"]["perplexity"] > 1.0 and 0.0 <= res["lambada"]["acc"] <= 1.0
    assert {"exact_match", "exact_match,flexible-extract"} <= set(res["gsm8k"])
    # 512-token context: 8 exemplars do not fit next to the 256-token generation budget, fewer are used
    assert 0 < res["gsm8k"]["num_fewshot_used"] < 8


# --------------------------------------------------------------------------- environment
def _offline_constants():
    import datasets.config
    import huggingface_hub.constants

    return huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE


@pytest.fixture
def online(monkeypatch):
    """An online caller: offline variables unset (or "0") and the libraries' offline constants False."""
    import datasets.config  # imported first: their import-time side effects are not ours
    import huggingface_hub.constants

    for var in [*ME.OFFLINE_ENV, "DISABLE_MULTIPROC", "MOEQ_TEST_SET_INSIDE"]:
        monkeypatch.delenv(var, raising=False)  # the "was unset" case ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # ... and a set value
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, attr, False)


def test_offline_scope_restores_the_environment_exactly(online):
    consts, env = _offline_constants(), dict(os.environ)
    with pytest.raises(RuntimeError), ME.offline():
        assert all(os.environ[v] == "1" for v in ME.OFFLINE_ENV) and _offline_constants() == (True, True, True)
        os.environ["MOEQ_TEST_SET_INSIDE"] = "1"  # like lm_eval's import-time os.environ.setdefault
        raise RuntimeError
    assert dict(os.environ) == env and _offline_constants() == consts


def test_task_run_leaves_environment_and_wikitext_calibration_unchanged(lm_mod, bundled, online, monkeypatch):
    """Offline only while tasks run: afterwards WikiText-2 calibration still takes the hub's train split
    (a leaked HF_HUB_OFFLINE=1 silently switched it to validation)."""
    import moeq.calib.sources as S

    hub, inside, real_configs = [], [], ME.task_configs

    def fake_hub(name, split):  # records every hub attempt
        hub.append(split)
        return ["hub text"], "hf://fake"

    def spy_configs(*args):  # records the offline state while a task is built
        inside.append((os.environ["HF_HUB_OFFLINE"], _offline_constants()))
        return real_configs(*args)

    monkeypatch.setattr(S, "_hub_reachable", lambda: True)
    monkeypatch.setattr(S, "_hub_docs", fake_hub)
    monkeypatch.setattr(ME, "task_configs", spy_configs)

    def calib():
        src = S.load_text("wikitext2", purpose="calib")
        return src.split, src.notes, src.origin

    consts, before, env = _offline_constants(), calib(), dict(os.environ)
    res = ME.run_tasks(bundled.model, bundled.tokenizer, ["copa"], limit=2)
    assert res["copa"]["n_samples"] == 2
    assert inside == [("1", (True, True, True))]  # offline while the task was built
    assert dict(os.environ) == env and _offline_constants() == consts
    assert calib() == before == ("train", [], "hf://fake") and hub == ["train", "train"]
