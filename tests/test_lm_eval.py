"""The lm-evaluation-harness backend: `colaprob lm-eval` on local tasks (YAML over JSON files
this test writes; nothing downloaded) gives per request the numbers of colaprob's own
estimators on the same texts and seeds. Skipped where lm_eval is not installed, except the
check of the message that says so."""

import importlib.util
import json
import sys

import numpy as np
import pytest

import colaprob
from colaprob import results
from colaprob.estimators.continuations import continuation_log_prob
from colaprob.estimators.rolling import rolling_log_prob

from cli_support import run_cli

if importlib.util.find_spec("lm_eval") is not None:
    from lm_eval.api.instance import Instance

    from colaprob.lm_eval import ColaprobLM, Settings

needs_harness = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is not installed (pip install 'colaprob[lm-eval]')"
)

MODEL_ARGS = "model=tiny,samples=2,seed=4,method=euler,steps=2,greedy=false"
FAST = dict(seed=4, chunk_size=32, trace="exact", method="euler", steps=2)

ITEMS = [
    {"context": "The value of the", "choices": ["object", "class", "module"], "label": 0},
    {"context": "A function is defined with", "choices": ["def", "class"], "label": 0},
]
DOCUMENTS = ["Every object has an identity, a type and a value.", "The with statement wraps a block in a context manager."]


@pytest.fixture()
def tasks(tmp_path, monkeypatch):
    """Two local tasks, a multiple choice and a rolling perplexity, in a folder of YAML."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (data / "ppl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mc.yaml").write_text(
        "task: colaprob_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "ppl.yaml").write_text(
        "task: colaprob_local_ppl\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data / 'ppl.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return folder


@needs_harness
def test_local_tasks_give_the_estimators_numbers_per_request(tasks, tmp_path):
    output = tmp_path / "out.json"
    outcome = run_cli("lm-eval", "--tasks", "colaprob_local_mc,colaprob_local_ppl", "--include-path", tasks, "--model-args", MODEL_ARGS, "-o", output)
    assert outcome.code == 0, outcome.err[-3000:]
    record = json.loads(output.read_text())
    tiny = colaprob.load("tiny")

    mc = sorted(record["samples"]["colaprob_local_mc"], key=lambda s: s["doc_id"])
    direct = continuation_log_prob(tiny, [i["context"] for i in ITEMS], [[" " + c for c in i["choices"]] for i in ITEMS], 2, item_ids=[0, 1], **FAST)
    for sample, item in zip(mc, ITEMS):
        assert [a[1] for a in sample["arguments"]] == [" " + c for c in item["choices"]]  # the harness's target delimiter
        got = [r[0][0] for r in sample["resps"]]
        assert np.allclose(got, direct.log_likelihood.values[sample["doc_id"], : len(got)], rtol=0, atol=1e-9)
    assert 0 <= record["results"]["colaprob_local_mc"]["acc,none"] <= 1

    ppl = sorted(record["samples"]["colaprob_local_ppl"], key=lambda s: s["doc_id"])
    rolling = rolling_log_prob(tiny, DOCUMENTS, 2, document_ids=[0, 1], **FAST)
    assert int(rolling.n_windows[1]) > 1  # the second document is longer than one window
    assert np.allclose([s["resps"][0][0] for s in ppl], rolling.log_likelihood.values, rtol=0, atol=1e-9)
    assert "results: " in outcome.out and "word_perplexity" in outcome.out


@needs_harness
def test_rolling_requests_equal_colaprob_score_rolling(tmp_path):
    """The harness's rolling log-likelihood is `colaprob score --rolling` on the same texts."""
    texts = tmp_path / "docs.txt"
    texts.write_text("\n".join(DOCUMENTS) + "\n")
    outcome = run_cli("score", texts, "--per-line", "--rolling", "-K", "2", "--method", "euler", "--steps", "2", "--seed", "4", "--quiet", "-o", tmp_path / "s.nc")
    assert outcome.code == 0, outcome.err
    scored = results.read_dataset(tmp_path / "s.nc")
    lm = ColaprobLM(model="tiny", samples=2, seed=4, method="euler", steps=2, greedy=False)
    requests = [Instance("loglikelihood_rolling", {}, (d,), i, ("t", i, 1)) for i, d in enumerate(DOCUMENTS)]
    assert np.allclose(lm.loglikelihood_rolling(requests), scored.log_likelihood.values, rtol=0, atol=1e-9)
    assert scored.attrs["windows"].startswith("documents longer than max_tokens were cut into windows scored as a chain")


@needs_harness
def test_is_greedy_is_whether_the_deterministic_decode_begins_with_the_continuation():
    lm = ColaprobLM(model="tiny", samples=1, method="euler", steps=1, gen_steps=2)
    from colaprob.generate import Sampling, generate

    decoded = generate(lm.model, ["The value"], Sampling(max_new_tokens=3, steps=2), seed=0)[0]
    requests = [Instance("loglikelihood", {}, ("The value", c), i, ("t", 0, 1)) for i, c in enumerate([decoded, decoded + "zzz"])]
    assert [greedy for _, greedy in lm.loglikelihood(requests)] == [True, False]


@needs_harness
def test_generate_until_cuts_at_the_stop_string():
    lm = ColaprobLM(model="tiny", samples=1, method="euler", steps=1, gen_steps=2)
    request = Instance("generate_until", {}, ("The value of", {"until": ["e"], "max_gen_toks": 12}), 0, ("t", 0, 1))
    full = ColaprobLM(model="tiny", samples=1, method="euler", steps=1, gen_steps=2)
    whole = full.generate_until([Instance("generate_until", {}, ("The value of", {"max_gen_toks": 12}), 0, ("t", 0, 1))])[0]
    assert lm.generate_until([request]) == [whole.split("e")[0]]


@needs_harness
def test_bad_model_arguments_are_one_line_errors(tasks):
    outcome = run_cli("lm-eval", "--tasks", "colaprob_local_mc", "--include-path", tasks, "--model-args", "samples=0")
    assert outcome.code == 2 and "samples must be a positive integer" in outcome.err and "Traceback" not in outcome.err
    outcome = run_cli("lm-eval", "--tasks", "colaprob_local_mc", "--include-path", tasks / "absent")
    assert outcome.code == 2 and "is not a folder" in outcome.err
    with pytest.raises(ValueError, match="unknown colaprob model argument"):
        Settings.from_arguments({"temperature": 1})


def test_without_the_harness_the_command_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if it were absent
    outcome = run_cli("lm-eval", "--tasks", "anything")
    assert outcome.code == 2 and "pip install 'colaprob[lm-eval]'" in outcome.err and "Traceback" not in outcome.err, outcome.err
