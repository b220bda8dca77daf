"""Record checks: accepted shapes, and one test per problem asserting the message names place and problem."""
import pickle
import subprocess
import sys

import pytest

from unipipe_ray.data import DataError, PreferencePair, parse_preference, parse_prompt, parse_sft

LOC = "train.jsonl:7"
USER = {"role": "user", "content": "hi"}


def error(parse, raw) -> DataError:
    with pytest.raises(DataError) as info:
        parse(raw, LOC)
    assert LOC in str(info.value)  # every message names where the record is
    return info.value


def test_sft_prompt_response_extra_fields_go_to_meta():
    ex = parse_sft({"prompt": "2+2?", "response": "4", "answer": "4", "id": 3}, LOC)
    assert ex.prompt == ({"role": "user", "content": "2+2?"},)
    assert (ex.response, ex.source, ex.meta) == ("4", LOC, {"answer": "4", "id": 3})


def test_sft_messages_last_assistant_turn_is_the_response():
    msgs = [USER, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ex = parse_sft({"messages": msgs, "system": "be brief"}, LOC)
    assert ex.response == "ciao"
    assert [m["role"] for m in ex.prompt] == ["system", "user", "assistant", "user"]
    assert ex.prompt[0]["content"] == "be brief"


def test_prompt_string_and_messages():
    assert parse_prompt({"prompt": "q", "answer": "1"}, LOC).meta == {"answer": "1"}
    assert parse_prompt({"messages": [USER]}, LOC).prompt == (USER,)


def test_preference_with_prompt_and_message_list_responses():
    pair = parse_preference({"prompt": [USER], "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": "b"}, LOC)
    assert pair == PreferencePair((USER,), "a", "b", LOC, {})


def test_hh_multi_turn_record_splits_into_turns():
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I am locked out."
    pair = parse_preference({"chosen": shared + "\n\nAssistant: Call a locksmith.",
                             "rejected": shared + "\n\nAssistant: Use a bobby pin."}, LOC)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[1]["content"] == "Why do you ask?"
    assert (pair.chosen, pair.rejected) == ("Call a locksmith.", "Use a bobby pin.")


def test_hh_prompts_that_differ_are_rejected():
    e = error(parse_preference, {"chosen": "\n\nHuman: a\n\nAssistant: x",
                                 "rejected": "\n\nHuman: b\n\nAssistant: y"})
    assert e.kind == "prompt_mismatch" and "first differing turn: 0" in str(e)


def test_hh_text_that_is_not_a_dialogue():
    e = error(parse_preference, {"chosen": "just text", "rejected": "other text"})
    assert e.kind == "malformed_dialogue" and "'chosen'" in str(e)


def test_missing_field():
    e = error(parse_sft, {"prompt": "q"})
    assert e.kind == "missing_field" and "'response'" in str(e)
    e = error(parse_preference, {"prompt": "q", "chosen": "a"})
    assert e.kind == "missing_field" and "'rejected'" in str(e)


def test_empty_field():
    e = error(parse_sft, {"prompt": "q", "response": "  "})
    assert e.kind == "empty_field" and "'response' is empty" in str(e)
    e = error(parse_preference, {"chosen": "\n\nHuman: q\n\nAssistant: ",
                                 "rejected": "\n\nHuman: q\n\nAssistant: x"})
    assert e.kind == "empty_field" and "'chosen'" in str(e)


def test_wrong_type_says_expected_and_got():
    e = error(parse_sft, {"prompt": "q", "response": 4})
    assert e.kind == "wrong_type" and "expected str, got int" in str(e)
    e = error(parse_prompt, {"prompt": {"text": "q"}})
    assert e.kind == "wrong_type" and "got dict" in str(e)
    assert error(parse_sft, ["not", "an", "object"]).kind == "wrong_type"


def test_identical_pair():
    e = error(parse_preference, {"prompt": "q", "chosen": "same", "rejected": "same "})
    assert e.kind == "identical_pair" and "identical" in str(e)


def test_unknown_role():
    e = error(parse_sft, {"messages": [{"role": "bot", "content": "x"},
                                       {"role": "assistant", "content": "y"}]})
    assert e.kind == "unknown_role" and "'bot'" in str(e) and "messages[0]" in str(e)


def test_last_turn_must_be_assistant_and_prompt_end_with_user():
    e = error(parse_sft, {"messages": [USER]})
    assert e.kind == "wrong_role" and "last turn" in str(e)
    assert error(parse_sft, {"messages": [{"role": "assistant", "content": "x"}]}).kind == "wrong_role"


def test_data_error_pickles_with_its_parts():
    # Ray moves exceptions between processes by pickling.
    e = pickle.loads(pickle.dumps(DataError("missing field 'x'", "missing_field", LOC)))
    assert (e.kind, e.loc, str(e)) == ("missing_field", LOC, f"{LOC}: missing field 'x' [missing_field]")


def test_importing_the_data_package_stays_light():
    heavy = "('ray', 'deepspeed', 'vllm', 'transformers', 'datasets')"
    code = f"import sys, unipipe_ray.data; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
