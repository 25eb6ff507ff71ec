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
    with pytest.raises(RewardTableError, match=r"does not say which rollouts it scored \(written by hand.*gdro import"):
        read_table(path, "a" * 64)
    with pytest.raises(RewardTableError, match="no reward table"):
        read_table(tmp_path / "missing.parquet", "a" * 64)


def test_each_rollout_image_must_occur_exactly_once():
    from gdro_core.data.scoring import reward_matrix

    good = pd.DataFrame({"prompt_index": [0, 0, 1, 1], "member": [0, 1, 0, 1], "reward": [1.0, 0.0, 0.5, 0.25]})
    assert reward_matrix(good, 2, 2).tolist() == [[1.0, 0.0], [0.5, 0.25]]
    # one row deleted and another duplicated: the same row count, rewards on the wrong images
    swapped = pd.concat([good.drop(index=3), good.iloc[[2]]], ignore_index=True)
    with pytest.raises(RewardTableError, match="prompt_index 1, member 0.*exactly once"):
        reward_matrix(swapped, 2, 2)
    stray = good.assign(member=[0, 1, 0, 5])
    with pytest.raises(RewardTableError, match="member 5 is no rollout image"):
        reward_matrix(stray, 2, 2)


def test_a_missing_or_corrupt_rollout_image_names_itself_and_the_fix(tmp_path):
    from PIL import Image

    from gdro_core.data.scoring import RolloutImageError, open_rollout_image

    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    assert open_rollout_image(tmp_path, "ok.png").size == (8, 8)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(RolloutImageError, match=r"bad.png is not a readable image.*gdro rollout"):
        open_rollout_image(tmp_path, "bad.png")
    with pytest.raises(RolloutImageError, match=r"gone.png is missing.*gdro rollout"):
        open_rollout_image(tmp_path, "gone.png")
