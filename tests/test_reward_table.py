"""A reward table belongs to the rollouts it scored: training on another rollout's table is refused."""

import pandas as pd
import pytest

from gdro_core.data.scoring import RewardTableError, read_table, write_table


def test_the_table_is_read_only_beside_the_rollouts_it_scored(tmp_path):
    table = pd.DataFrame({"prompt_index": [0, 0], "member": [0, 1], "reward": [1.0, 0.5]})
    path = write_table(table, tmp_path / "rewards.parquet", "a" * 64)
    pd.testing.assert_frame_equal(read_table(path, "a" * 64), table)
    # `gdro rollout --set rollout.seed=2000` without rescoring: new rollouts, old table
    with pytest.raises(RewardTableError, match=r"scored other rollouts \(aaaaaaaaaaaa\).*\(bbbbbbbbbbbb\).*gdro score"):
        read_table(path, "b" * 64)


def test_a_table_without_its_rollout_stamp_is_refused(tmp_path):
    path = tmp_path / "rewards.parquet"
    pd.DataFrame({"reward": [1.0]}).to_parquet(path)
    with pytest.raises(RewardTableError, match=r"\(unknown\)"):
        read_table(path, "a" * 64)
    with pytest.raises(RewardTableError, match="no reward table"):
        read_table(tmp_path / "missing.parquet", "a" * 64)
