"""Weighted pretraining sources: the train_files syntax, one store per source, blocks drawn by weight."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmtrain.config.arguments import PretrainDataArguments, SFTDataArguments
from llmtrain.config.sources import parse_sources, split_weight
from llmtrain.data.pretrain import prepare_pretrain_data
from llmtrain.data.sources import WeightedBlocks, draws_per_source
from llmtrain.errors import ConfigError, DataError

from ..conftest import prose_records, write_jsonl


def test_weights_in_the_cli_and_the_yaml_list_form(tmp_path: Path) -> None:
    cli = parse_sources(["web/*.jsonl:0.7,code/:0.3"])
    yaml_list = parse_sources(["web/*.jsonl:0.7", "code/:0.3"])
    assert cli == yaml_list and [(s.name, s.specs, s.weight) for s in cli] == [
        ("web/*.jsonl", ("web/*.jsonl",), 0.7), ("code/", ("code/",), 0.3)
    ]  # fmt: skip
    assert [s.weight for s in parse_sources(["a:2", "b:6"])] == [0.25, 0.75]  # relative
    unweighted = parse_sources(["a.jsonl", "b/"])
    assert len(unweighted) == 1 and unweighted[0].weight is None and unweighted[0].specs == ("a.jsonl", "b/")
    odd = tmp_path / "run:2"  # an existing path is a path, whatever it ends with
    odd.write_text("{}")
    assert split_weight(str(odd)) == (str(odd), None)


@pytest.mark.parametrize(
    ("train_files", "message"),
    [
        (["web/:0.7", "code/"], r"train_files: some entries have a weight and code/ has none"),
        (["web/:0", "code/:1"], r"train_files: weights must be positive"),
    ],
)
def test_bad_weights_are_one_error_naming_train_files(train_files: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PretrainDataArguments(train_files=train_files)


def test_sft_takes_no_weights() -> None:
    with pytest.raises(ConfigError, match=r"train_files: weights are for pretraining sources"):
        SFTDataArguments(train_files=["chat.jsonl:0.5", "more.jsonl:0.5"])


def test_draws_follow_the_weights_to_one_block() -> None:
    assert draws_per_source([1000, 10, 90], [0.5, 0.3, 0.2]) == [550, 330, 220]
    assert sum(draws_per_source([7, 5, 3], [0.33, 0.33, 0.34])) == 15


def write_sources(tmp_path: Path) -> tuple[Path, Path]:
    big = write_jsonl(tmp_path / "web.jsonl", prose_records(200))
    small = write_jsonl(tmp_path / "code.jsonl", [{"text": f"def f{i}(x): return x + {i}\n" * 3} for i in range(40)])
    return big, small


def data_args(tmp_path: Path, train_files: list[str], **overrides: object) -> PretrainDataArguments:
    values: dict[str, object] = {"train_files": train_files, "block_size": 16, "validation_split_percentage": 5.0,
                                 "dataset_cache_dir": str(tmp_path / "cache")}  # fmt: skip
    return PretrainDataArguments(**{**values, **overrides})  # type: ignore[arg-type]


def test_each_source_is_a_store_and_a_long_draw_realises_the_weights(
    tiny_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big, small = write_sources(tmp_path)
    with caplog.at_level(logging.INFO, logger="llmtrain.data.pretrain"):
        prepared = prepare_pretrain_data(data_args(tmp_path, [f"{big}:0.4", f"{small}:0.6"]), tiny_tokenizer)
    assert sorted(p.name for p in (prepared.path / "train").iterdir()) == ["0", "1"]
    mixed = prepared.train
    assert isinstance(mixed, WeightedBlocks) and len(mixed.blocks[0]) > 4 * len(mixed.blocks[1])
    stats = prepared.metadata["stats"]
    assert [s["token_share"] for s in stats["source_shares"]] == pytest.approx([0.4, 0.6], abs=0.01)
    assert f"source {big}: weight 0.400" in caplog.text and f"source {small}: weight 0.600" in caplog.text
    # A long draw through the Trainer's kind of sampler (seeded, reshuffled each epoch): token shares within 2 %.
    generator = torch.Generator().manual_seed(42)
    drawn = Counter(mixed.source_of(int(i)) for _ in range(20) for i in torch.randperm(len(mixed), generator=generator))
    total = sum(drawn.values())
    assert drawn[0] / total == pytest.approx(0.4, abs=0.02) and drawn[1] / total == pytest.approx(0.6, abs=0.02)
    # The small source is repeated (1.5 passes per epoch), in pseudo-random order, every block of it used.
    small_blocks = {tuple(mixed[i]["input_ids"].tolist()) for i in range(len(mixed)) if mixed.source_of(i) == 1}
    assert len(small_blocks) == len(mixed.blocks[1])


def test_new_weights_reuse_the_stores_and_a_single_store_refuses_weights(tiny_tokenizer, tmp_path: Path) -> None:
    big, small = write_sources(tmp_path)
    first = prepare_pretrain_data(data_args(tmp_path, [f"{big}:0.4", f"{small}:0.6"]), tiny_tokenizer)
    again = prepare_pretrain_data(data_args(tmp_path, [f"{big}:0.9,{small}:0.1"]), tiny_tokenizer)
    assert not again.built and again.path == first.path  # weights are drawn at load time
    assert [s["token_share"] for s in again.metadata["stats"]["source_shares"]] == pytest.approx([0.9, 0.1], abs=0.01)
    target = tmp_path / "one-source"
    prepare_pretrain_data(data_args(tmp_path, [str(big), str(small)], tokenized_path=str(target)), tiny_tokenizer)
    with pytest.raises(DataError, match=r"holds one train source, but train_files gives 2 weighted ones"):
        prepare_pretrain_data(
            data_args(tmp_path, [f"{big}:0.5", f"{small}:0.5"], tokenized_path=str(target)), tiny_tokenizer
        )
