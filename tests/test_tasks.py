"""The official evaluation format, its framing rules, the official string match and the
embedded cloze task. The records below are written here in the official format (invented
content, a few lines per task)."""

import json
import os

import pytest

from colaprob import tasks
from colaprob.errors import ColaprobError

QA = "Question: Which is a fruit?\n(A) stone\n(B) apple\nAnswer: apple\n\nQuestion: "

OFFICIAL = {
    "lambada": [
        {"id": 1, "prompt": "He put the key in the lock and opened the", "generate": " door.", "ground_truth": "door", "others": "\nShe smiled."},
        {"id": 4, "prompt": "The dog barked at the", "generate": "\n\n cat", "ground_truth": "mailman"},
    ],
    "mmlu": [
        {"id": 0, "prompt": "What is 2 + 3?\n(A) 4\n(B) 5\n(C) 6\n(D) 7\nAnswer:", "generate": " 5", "ground_truth": "5", "choices": ["4", "5", "6", "7"], "others": "\nQuestion: What", "few_shot_prefix": QA},
        {"id": 8, "prompt": "Which is a colour?\n(A) red\n(B) run\n(C) rock\n(D) rain\nAnswer:", "generate": " (B)", "ground_truth": "red", "choices": ["red", "run", "rock", "rain"], "few_shot_prefix": QA},
    ],
    "obqa": [
        {"id": 0, "prompt": "Plants need\n(A) sunlight\n(B) plastic\n(C) iron\n(D) glass\nAnswer:", "generate": " sunlight", "ground_truth": "sunlight", "choices": ["sunlight", "plastic", "iron", "glass"], "others": "\n", "few_shot_prefix": QA},
    ],
    "hellaswag": [
        {"id": 0, "prompt": "A man lifts a box. he\n(A) puts it on a shelf.\n(B) eats the box.\nAnswer:", "generate": " puts it on a shelf.", "ground_truth": "puts it on a shelf.", "choices": ["puts it on a shelf.", "eats the box."], "few_shot_prefix": "Context: A girl runs. she\n(A) stops.\n(B) flies.\nAnswer: stops.\n\nContext: "},
    ],
    "race": [
        {"id": 0, "prompt": "Tom likes tea.\nQuestion: What does Tom like?\n(A) tea\n(B) milk\n(C) juice\n(D) water\nAnswer:", "generate": " milk", "ground_truth": "tea", "choices": ["tea", "milk", "juice", "water"], "few_shot_prefix": "Article: Ann has a cat.\nQuestion: What does Ann have?\n(A) a dog\n(B) a cat\n(C) a fish\n(D) a bird\nAnswer: a cat\n\nArticle: "},
    ],
    "siqa": [
        {"id": 0, "prompt": "What will Sam want next?\n(A) sleep\n(B) eat\n(C) swim\nAnswer:", "generate": " eat", "ground_truth": "Eat", "choices": ["sleep", "Eat", "swim"], "few_shot_prefix": QA},
    ],
    "squad": [
        {"id": "5a1b", "prompt": "Paris is in France.\nQuestion: Where is Paris?\nAnswer:", "generate": " France", "ground_truth": "France", "others": "\n\nContext:", "few_shot_prefix": "Context: Rome is in Italy.\nQuestion: Where is Rome?\nAnswer: Italy\n\nContext: "},
        {"id": "5a1c", "prompt": "Berlin is in Germany.\nQuestion: Where is Berlin?\nAnswer:", "generate": " in Germany", "ground_truth": "Germany", "few_shot_prefix": "Context: Rome is in Italy.\nQuestion: Where is Rome?\nAnswer: Italy\n\nContext: "},
    ],
    "story_cloze": [
        {"id": 1, "prompt": "Amy baked a cake. She shared it.\n(A) Her friends loved it.\n(B) The cake flew away.\nEnd:", "generate": " Her friends loved it.", "ground_truth": "Her friends loved it.", "choices": ["Her friends loved it.", "The cake flew away."], "few_shot_prefix": "Story: Bo ran. He won.\n(A) He was happy.\n(B) He was a tree.\nEnd: He was happy.\n\nStory: "},
    ],
}


def write_official(folder, only=None) -> list:
    """The task files of ``OFFICIAL`` (all, or the names in ``only``) in ``folder``."""
    paths = []
    for name, records in OFFICIAL.items():
        if only is None or name in only:
            path = folder / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            paths.append(path)
    return paths


@pytest.fixture
def read(tmp_path):
    return lambda name: tasks.read_official(write_official(tmp_path, [name])[0])


def test_the_context_is_the_few_shot_prefix_then_the_prompt(read):
    item = read("mmlu").items[0]
    assert item.context == QA + OFFICIAL["mmlu"][0]["prompt"]
    assert item.context.startswith("Question: Which is a fruit?") and item.context.endswith("Answer:")
    assert read("lambada").items[0].context == OFFICIAL["lambada"][0]["prompt"]  # no prefix field: the prompt alone


def test_answers_get_the_leading_space_and_generations_are_verbatim(read):
    mmlu = read("mmlu")
    assert mmlu.items[0].choices == [" 4", " 5", " 6", " 7"] and mmlu.items[0].gold == 1
    assert mmlu.items[0].generate == " 5"
    squad = read("squad")
    assert squad.items[0].choices == [" France"] and not squad.multiple_choice
    assert squad.items[0].id == "5a1b"
    lambada = read("lambada")
    assert lambada.items[1].generate == "\n\n cat"  # no newline after a word: nothing to cut


def test_a_trailing_context_space_is_not_doubled():
    assert tasks.with_delimiter("Answer:", "4") == " 4"
    assert tasks.with_delimiter("Answer: ", "4") == "4"  # the context's space moves to it (continuations module)
    assert tasks.with_delimiter("Answer:", " 4") == " 4"


def test_generation_cut_at_the_first_newline_after_a_word():
    assert tasks.first_line(" yes\nno") == " yes"
    assert tasks.first_line("\n\n yes\nno") == "\n\n yes"
    assert tasks.first_line(" yes") == " yes"


def test_every_field_is_used_or_named_in_a_warning(tmp_path):
    path = tmp_path / "obqa.jsonl"
    record = dict(OFFICIAL["obqa"][0], extracted_gen_choice="A")
    path.write_text(json.dumps(record) + "\n")
    task = tasks.read_official(path)
    text = " ".join(task.warnings)
    assert "'others'" in text and "'extracted_gen_choice'" in text and len(task.warnings) == 2
    quiet = tmp_path / "siqa.jsonl"
    quiet.write_text(json.dumps(OFFICIAL["siqa"][0]) + "\n")
    assert tasks.read_official(quiet).warnings == []


def test_an_unknown_task_name_says_which_rule_it_gets(tmp_path):
    (path,) = write_official(tmp_path, ["obqa"])
    assert "exact-match rule" in " ".join(tasks.read_official(path, "my_task").warnings)


@pytest.mark.parametrize(
    "name, expected",
    [("lambada", [True, False]), ("mmlu", [True, False]), ("obqa", [True]), ("hellaswag", [True]), ("race", [False]), ("siqa", [True]), ("squad", [True, False]), ("story_cloze", [True])],
)
def test_official_string_match(read, name, expected):
    task = read(name)
    assert [tasks.generation_correct(name, item) for item in task.items] == expected


def test_option_reading_rules():
    choices = ["red", "run", "rock", "rain"]
    assert tasks.generated_option(" (B)", choices) == 1
    assert tasks.generated_option("The answer is C.", choices) == 2
    assert tasks.generated_option(" Rock!", choices) == 2
    assert tasks.generated_option(" the answer: rain", choices) == 3
    assert tasks.generated_option(" E", choices) is None  # beyond the choices
    assert tasks.generated_option(" nothing like it", choices) is None
    assert tasks.gold_choice("B", choices) == 1 and tasks.gold_choice("red", choices) == 0
    assert tasks.similarity("Hello, World", "hello world") == 1.0


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("not json", "not a JSON object"),
        ('{"id": 1, "ground_truth": "a"}', "'prompt'"),
        ('{"id": 1, "prompt": "p", "ground_truth": "z", "choices": ["a", "b"]}', "none of the choices"),
        ('{"id": 1, "prompt": "p", "ground_truth": "a", "choices": "ab"}', "'choices' must be"),
    ],
)
def test_bad_records_are_one_sentence(tmp_path, line, fragment):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ColaprobError, match=fragment):
        tasks.read_official(path)


def test_embedded_cloze_is_deterministic_and_fits_the_embedded_context():
    task = tasks.embedded_cloze(8, seed=0)
    assert [i.choices for i in task.items] == [i.choices for i in tasks.embedded_cloze(8, seed=0).items]
    assert len(task.items) == 8 and task.multiple_choice
    for item in task.items:
        assert item.choices[item.gold] == " " + item.ground_truth and len(set(item.choices)) == 4
        assert max(len((item.context + c).encode()) for c in item.choices) <= 60
        assert item.ground_truth not in item.context.split()[-1:]
    assert [i.gold for i in task.items] != [task.items[0].gold] * 8  # the answer's position varies


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[" * 100000 + "]" * 100000 + "\n", "nests arrays or objects deeper"),
        ('{"id": 1, "prompt": "a", "ground_truth": "' + "\\ud800" + '"}\n', "lone surrogate"),
        ('{"id": ' + "9" * 5000 + ', "prompt": "a", "ground_truth": "b"}\n', "digits"),
        ('{"prompt": "a\u2028b", "ground_truth": "c"}\n', None),  # U+2028 is inside a line, not a break
    ],
)
def test_official_files_are_read_with_the_input_limits(tmp_path, content, fragment):
    path = tmp_path / "lambada.jsonl"
    path.write_text(content, encoding="utf-8")
    if fragment is None:
        assert [item.context for item in tasks.read_official(path).items] == ["a\u2028b"]
        return
    with pytest.raises(ColaprobError, match=fragment):
        tasks.read_official(path)


def test_an_official_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "mmlu.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ColaprobError, match="not a regular file|FIFO"):
        tasks.read_official(fifo)
