"""``colaprob eval`` on the eight official task files (written by the tests) with the fixture
checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

import colaprob
from colaprob import results, tasks
from colaprob.commands import eval as eval_command
from colaprob.estimators.continuations import continuation_log_prob

from cli_support import FAST, assert_one_line_error, checkpoint_with_limit, run_cli
from test_tasks import OFFICIAL, write_official

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny-a"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    paths = write_official(folder)
    output = folder / "eval.nc"
    outcome = run_cli("eval", *paths, "--model", FIXTURE, *FAST, "-o", output)
    return outcome, results.read_dataset(output), paths, output


def test_all_eight_tasks_run_and_print_one_row_each(evaluated):
    outcome, ds, _, _ = evaluated
    assert outcome.code == 0, outcome.err
    for name in OFFICIAL:
        assert any(line.startswith(name + " ") for line in outcome.out.splitlines()), outcome.out
    assert "acc (likelihood)" in outcome.out and "acc (generation)" in outcome.out
    assert outcome.err.count("field 'others'") == 4  # named once in each of the four files that have it
    assert dict(ds.sizes) == {"item": sum(len(v) for v in OFFICIAL.values()), "choice": 4}


def test_verdicts_follow_from_the_scores(evaluated):
    _, ds, _, _ = evaluated
    mc = ds.multiple_choice.values.astype(bool)
    ll = np.where(ds.choice_valid.values, ds.log_likelihood.values, -np.inf)
    assert (ds.chosen.values[mc] == ll[mc].argmax(1)).all()
    assert (ds.correct.values[mc] == (ds.chosen.values[mc] == ds.gold.values[mc])).all()
    assert np.isnan(ds.correct.values[~mc]).all()  # open tasks (lambada, squad): no choice to make
    per_byte = ll / np.maximum(ds.n_bytes.values, 1)
    assert (ds.chosen_norm.values[mc] == per_byte[mc].argmax(1)).all()
    expected = [float(tasks.generation_correct(t, item)) for t in OFFICIAL for item in tasks.read_official(_file(evaluated, t)).items]
    assert ds.generation_correct.values.tolist() == expected
    assert np.isfinite(ds.generate_log_likelihood.values).all() and np.isfinite(ds.log_likelihood_se.values[ds.choice_valid.values]).all()
    # obqa's generation is its answer: no preference to report; mmlu item 8's is not
    rows = {(t, i): n for n, (t, i) in enumerate(zip(ds.task.values, ds.item_id.values))}
    assert np.isnan(ds.prefers_generation.values[rows[("obqa", "0")]])
    assert np.isfinite(ds.prefers_generation.values[rows[("mmlu", "8")]])


def _file(evaluated, name):
    return next(p for p in evaluated[2] if p.stem == name)


def test_scores_are_the_continuation_estimator_on_the_framed_item(evaluated):
    _, ds, _, _ = evaluated
    model = colaprob.load(str(FIXTURE))
    task = tasks.read_official(_file(evaluated, "mmlu"))
    position = int(np.nonzero((ds.task.values == "mmlu"))[0][1])
    item = task.items[1]
    direct = continuation_log_prob(
        model, [item.context], [item.choices + [item.generate]], 2, item_ids=[position], trace="hutchinson", method="euler", steps=2
    )
    assert np.allclose(ds.log_likelihood.values[position], direct.log_likelihood.values[0, :4], atol=1e-4)
    assert np.isclose(ds.generate_log_likelihood.values[position], direct.log_likelihood.values[0, 4], atol=1e-4)


def test_a_rerun_reads_the_result_back_and_json_summarises(evaluated):
    _, ds, paths, output = evaluated
    outcome = run_cli("eval", *paths, "--model", FIXTURE, *FAST, "-o", output, "--json")
    assert outcome.code == 0
    summary = json.loads(outcome.out)
    assert set(summary["tasks"]) == set(OFFICIAL)
    assert summary["tasks"]["mmlu"]["items"] == 2 and summary["tasks"]["lambada"]["acc"] is None
    assert summary["tasks"]["siqa"]["gen_acc"] == 1.0
    assert np.array_equal(results.read_dataset(output).log_likelihood.values, ds.log_likelihood.values, equal_nan=True)


def test_every_score_carries_its_solver_error_and_the_choices_it_could_change(evaluated):
    """Each choice's (and generation's) log p has its estimated solver error; an item's
    likelihood choice is flagged where its lead over the runner-up is within their summed
    errors (on 2 Euler steps, every multiple-choice item of the fixture), and the table says
    how many."""
    outcome, ds, _, _ = evaluated
    valid = ds.choice_valid.values.astype(bool)
    error = ds.log_likelihood_solver_error.values
    assert (error[valid] > 0).all() and np.isnan(error[~valid]).all() and (ds.generate_log_likelihood_solver_error.values[ds.has_generate.values] > 0).all()
    ll = np.where(valid, ds.log_likelihood.values, -np.inf)
    mc = ds.multiple_choice.values.astype(bool)
    for i in np.nonzero(mc)[0]:
        first, second = np.argsort(-ll[i], kind="stable")[:2]
        assert ds.within_solver_error.values[i] == float(ll[i, first] - ll[i, second] <= error[i, first] + error[i, second])
    assert np.isnan(ds.within_solver_error.values[~mc]).all() and (ds.within_solver_error.values[mc] == 1).all()
    assert "choice within solver error" in outcome.out and "choice within 2 SE" in outcome.out
    # And within the Monte Carlo error: a lead of at most two of its (paired) standard errors.
    assert (ds.within_monte_carlo_error.values[mc] == (ds.choice_margin.values[mc] <= 2 * ds.choice_margin_se.values[mc])).all()
    assert np.isnan(ds.within_monte_carlo_error.values[~mc]).all() and (ds.choice_margin.values[mc] >= 0).all()


def test_the_choice_within_solver_error_rule():
    ll = np.array([[-1.0, -2.0, -np.inf], [-1.0, -2.0, -3.0], [-5.0, -np.inf, -np.inf]])
    error = np.array([[0.4, 0.5, np.nan], [0.6, 0.5, 9.0], [3.0, np.nan, np.nan]])
    # A lead of 1 nat: 0.9 nats of error cannot change it, 1.1 can; a lone choice cannot change.
    assert eval_command.choice_within_solver_error(ll, error).tolist() == [0.0, 1.0, 0.0]


def test_the_lead_of_the_likelihood_choice_has_a_paired_standard_error():
    """The lead of the first choice over the runner-up is a difference of two IWAE estimates
    on the same draws: its SE is ``sd(w_a / mean w_a - w_b / mean w_b) / sqrt(K)``, 0 when the
    two choices' weights differ by a constant, although each alone has a large SE. The
    generation (the column after an item's choices) is never a choice."""
    import xarray as xr

    rng = np.random.default_rng(0)
    K = 64
    base = rng.normal(0.0, 1.0, K)
    noise = rng.normal(0.0, 0.3, K)
    weights = np.stack([base - 2.0, base + 0.8 + noise, base + 0.5, base + 9.0])[None]  # choices 0-2, the generation
    log_mean_exp = lambda w: np.log(np.exp(w).mean())
    ll = np.array([[log_mean_exp(w) for w in weights[0]]])
    ds = xr.Dataset({"log_weight": (("item", "choice", "sample"), weights), "log_likelihood": (("item", "choice"), ll)})
    first, second, _ = eval_command.top_two(ll[:, :3])
    assert (first[0], second[0]) == (1, 2)  # the generation, highest of all, is left out
    wa, wb = np.exp(weights[0, 1]), np.exp(weights[0, 2])
    expected = np.std(wa / wa.mean() - wb / wb.mean(), ddof=1) / np.sqrt(K)
    assert np.isclose(eval_command.margin_se(ds, np.array([3]))[0], expected, rtol=1e-6)
    assert eval_command.margin_se(ds.isel(choice=[0, 2, 3]), np.array([2]))[0] < 1e-12  # a constant difference
    assert np.isnan(eval_command.margin_se(ds.isel(choice=[0, 3]), np.array([1]))[0])  # one choice: no lead


def test_without_the_solver_error_the_table_says_so(tmp_path):
    (path,) = write_official(tmp_path, ["mmlu"])
    outcome = run_cli("eval", path, "--model", FIXTURE, *FAST, "--no-solver-error", "-o", tmp_path / "out.nc")
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(tmp_path / "out.nc")
    assert "log_likelihood_solver_error" not in ds and "within_solver_error" not in ds
    assert "not estimated" in outcome.out.splitlines()[1]


def test_target_error_tightens_until_every_item_meets_it(tmp_path):
    (path,) = write_official(tmp_path, ["mmlu"])
    coarse = run_cli("eval", path, "--model", FIXTURE, *FAST, "-o", tmp_path / "coarse.nc")
    assert coarse.code == 0, coarse.err
    largest = eval_command.largest_solver_error(results.read_dataset(tmp_path / "coarse.nc").rename({"item": "sequence"}))
    target = float(largest.min()) / 3
    outcome = run_cli("eval", path, "--model", FIXTURE, *FAST, "--target-error", repr(target), "-o", tmp_path / "fine.nc")
    assert outcome.code == 0, outcome.err
    ds = results.read_dataset(tmp_path / "fine.nc")
    assert (eval_command.largest_solver_error(ds.rename({"item": "sequence"})) <= target).all() and ds.solver_error_target_met.all()
    assert all(setting.startswith("euler steps ") and int(setting.split()[-1]) > 2 for setting in ds.solver_setting.values)
    refused = run_cli("eval", path, "--model", FIXTURE, *FAST, "--target-error", "0.1", "--no-solver-error", "-o", tmp_path / "x.nc")
    assert_one_line_error(refused, "--target-error needs the solver-error estimate")


def test_bad_input_is_one_sentence(tmp_path):
    (path,) = write_official(tmp_path, ["mmlu"])
    assert_one_line_error(run_cli("eval", tmp_path / "none.jsonl", "--model", FIXTURE, *FAST), "does not exist")
    assert_one_line_error(run_cli("eval", path, path.with_name("x.jsonl"), "--task", "mmlu", "--model", FIXTURE, *FAST), "--task")
    limited = checkpoint_with_limit(FIXTURE, tmp_path / "limited", 16)
    outcome = run_cli("eval", path, "--model", limited, *FAST, "-o", tmp_path / "out.nc")
    assert_one_line_error(outcome, "mmlu item 0", "limit of 16")
    assert not (tmp_path / "out.nc").exists()
    # A batch of items whose choices cannot fit in memory is refused before any work.
    outcome = run_cli("eval", path, "--model", FIXTURE, *FAST, "--max-memory", "64K", "-o", tmp_path / "out.nc")
    assert_one_line_error(outcome, "with one sample and one vector-Jacobian product at a time would need about", "more than --max-memory (64.0 KB)")
    assert not (tmp_path / "out.nc").exists()


def test_viz_draws_the_per_task_comparison(evaluated, tmp_path):
    _, _, _, output = evaluated
    outcome = run_cli("viz", output, "-o", tmp_path / "tasks.png", "--no-labels")
    assert outcome.code == 0, outcome.err
    assert (tmp_path / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_means_and_standard_errors_over_items(evaluated):
    _, ds, _, _ = evaluated
    table = tasks.summarise(ds)
    lam = table.sel(task="lambada")
    assert int(lam["items"]) == 2 and int(lam["acc_items"]) == 0 and np.isnan(float(lam["acc"]))
    assert float(lam["gen_acc"]) == 0.5 and np.isclose(float(lam["gen_acc_se"]), 0.5)  # one of two: sd 0.707 / sqrt 2


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, fixture_dirs):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "Q: 2+2?\nAnswer:", "ground_truth": "4", "choices": ["3", "4"]}) + "\n")
    before = path.read_bytes()
    done = run_cli("eval", path, "-o", path, "--overwrite", "--model", fixture_dirs[0], "--method", "rk4", "--steps", "2", "-K", "2")
    assert done.code == 2 and "is the input file" in done.err and "Traceback" not in done.err
    assert path.read_bytes() == before
