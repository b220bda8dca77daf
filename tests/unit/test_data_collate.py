"""Collation: shapes, padding side and values, pair row order."""
import pytest
import torch

from unipipe_ray.data import collate_preference, collate_prompts, collate_sft, select_pairs

PAD = 9


def test_sft_right_pads_ids_mask_and_labels():
    batch = collate_sft([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                         {"input_ids": [4], "labels": [4]}], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_to_multiple_of():
    batch = collate_sft([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 3:].eq(-100).all()


def test_preference_puts_b_chosen_rows_then_b_rejected_rows():
    pairs = [{"chosen_input_ids": [1, 10], "chosen_labels": [-100, 10],
              "rejected_input_ids": [1, 20, 21], "rejected_labels": [-100, 20, 21]},
             {"chosen_input_ids": [2, 11], "chosen_labels": [-100, 11],
              "rejected_input_ids": [2, 22], "rejected_labels": [-100, 22]}]
    batch = collate_preference(pairs, PAD)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 3)
    assert batch["input_ids"].tolist() == [[1, 10, PAD], [2, 11, PAD], [1, 20, 21], [2, 22, PAD]]
    assert batch["labels"][:, 0].eq(-100).all()


def test_prompts_are_left_padded():
    batch = collate_prompts([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        collate_sft([], PAD)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate_prompts([{"input_ids": [1]}], None)


def test_select_pairs_equals_collating_the_kept_pairs_alone():
    """DPO's kept pairs are cut from the collated micro-batch instead of collated a second time."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(6):
        c, r = (torch.randint(1, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(2))
        pairs.append({"chosen_input_ids": c, "chosen_labels": [-100] + c[1:],
                      "rejected_input_ids": r, "rejected_labels": [-100] + r[1:]})
    batch = collate_preference(pairs, PAD)
    for kept in ([0], [1, 3], [0, 2, 5], [4, 5], list(range(6))):
        cut, alone = select_pairs(batch, kept), collate_preference([pairs[j] for j in kept], PAD)
        assert cut.keys() == alone.keys() and all(torch.equal(cut[k], alone[k]) for k in alone), kept
