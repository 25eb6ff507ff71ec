"""Scoring that survives a failing reader, and scoring chunks that merge into the serial table."""

import builtins

import pandas as pd
import pytest
from PIL import Image

from gdro_core.data.fanout import FanoutError, task_runner, worker_count, worker_threads
from gdro_core.data.scoring import ScoringError, check_errors, merge_tables, split_rows
from gdro_core.params import Scale
from gdro_core.tasks.ocr.reward import score_images


class FlakyReader:
    """Reads an image's grey level as text, and fails on level 7 (an image the OCR engine chokes on)."""

    def __init__(self):
        self.calls = []

    def read(self, images):
        self.calls.append(len(images))
        levels = [im.getpixel((0, 0)) for im in images]
        if 7 in levels:
            raise RuntimeError("CRAFT detector: empty score map")
        return [f"{v:03d}" for v in levels]


def _images(levels):
    return [Image.new("L", (8, 8), v) for v in levels]


def test_one_failing_image_scores_zero_and_keeps_its_error_while_the_rest_are_scored():
    reader = FlakyReader()
    table = score_images(_images([1, 7, 3, 4]), ["001", "007", "003", "999"], reader, False, batch_size=2)
    assert list(table["reward"]) == [1.0, 0.0, 1.0, 0.0]
    assert list(table["exact"]) == [True, False, True, False]
    assert table["error"].tolist() == ["", "RuntimeError: CRAFT detector: empty score map", "", ""]
    assert reader.calls == [2, 1, 1, 2]  # only the failing batch is read again, one image at a time
    assert check_errors(table, max_share=0.25) == 1


def test_too_many_failures_fail_the_stage_with_the_threshold_named():
    table = score_images(_images([7, 7, 3, 4]), ["007", "007", "003", "004"], FlakyReader(), False, batch_size=4)
    with pytest.raises(ScoringError, match=r"2 of 4 images .*reward.max_error_share.*CRAFT detector"):
        check_errors(table, max_share=0.25)


def test_chunks_scored_in_any_order_merge_into_the_serial_table():
    rows = [{"prompt_index": p, "member": m, "target": f"{p}{m}"} for p in range(3) for m in range(2)]
    manifest = {"rows": rows, "shards": {"shard-0000.safetensors": "", "shard-0001.safetensors": "",
                                          "shard-0002.safetensors": ""}}
    chunks = split_rows(manifest)
    assert [len(c) for c in chunks] == [2, 2, 2] and [r for c in chunks for r in c] == rows
    parts = [pd.DataFrame.from_records(c).assign(reward=[0.5] * len(c)) for c in chunks]
    serial = pd.DataFrame.from_records(rows).assign(reward=0.5)
    pd.testing.assert_frame_equal(merge_tables(parts[::-1]), serial)


def test_workers_and_threads_follow_the_params():
    assert worker_count(Scale(runner="dask", workers=3)) == 3
    assert worker_threads(Scale(runner="dask", workers=2, threads_per_worker=5), 2) == 5
    assert worker_threads(Scale(runner="dask", workers=64), 64) == 1


def test_a_missing_runner_package_names_the_install(monkeypatch):
    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name == "prefect_dask":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(FanoutError, match=r"prefect-dask is not installed.*\.\[scale\]"):
        task_runner(Scale(runner="dask"))


def test_an_address_without_a_cluster_runner_is_rejected():
    with pytest.raises(ValueError, match="scale.runner is 'local'"):
        Scale(runner="local", address="tcp://127.0.0.1:8786")
