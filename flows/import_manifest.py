"""Stage `import`: your own images and rewards (``data.manifest``) into the rollout store and the reward table,
in place of `rollout` + `score` (``data.source: import``; docs/import-export.md).

The store is the one `gdro rollout` writes (sharded, hashed, fingerprinted) and the table is tied to it, so train,
evaluate, later rounds and sweeps read it unchanged."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger

from flows.context import load_layout
from gdro_core.cache_keys import import_fingerprint
from gdro_core.data.manifest import import_manifest
from gdro_core.data.rollout import MANIFEST, is_complete
from gdro_core.data.scoring import RewardTableError, read_table
from gdro_core.data.store import read_json
from gdro_core.models import load_model
from gdro_core.models.identity import base_fingerprint
from gdro_core.tasks.registry import caption_words
from gdro_core.tracking.runs import stage_run


@flow(name="import")
def import_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> int:
    lay = load_layout(params_path, overrides)
    p = lay.params
    logger = get_run_logger()
    with stage_run(p, lay.root, "import"):
        fp = import_fingerprint(lay)
        base = base_fingerprint(p.model.source, lay.base_dir)
        try:
            done = is_complete(lay.rollout_dir, fp) and len(read_table(lay.rewards, fp)) > 0
        except RewardTableError:
            done = False
        if done:
            rows = len(read_json(lay.rollout_dir / MANIFEST)["rows"])
            logger.info("%s is imported already (%d images in %s)", lay.import_manifest, rows, lay.rollout_dir)
        else:
            result = import_manifest(lay.import_manifest, p, lambda: load_model(p, lay.base_dir), lay.rollout_dir,
                                     lay.rewards, fp, base, log=logger.warning, words=caption_words(p))
            rows = result.rows
            logger.info("%s", result.summary())
            mlflow.log_metrics({"import_groups": len(result.groups.kept), "import_encoded": result.encoded,
                                "import_reused_latents": result.reused, "import_trimmed_rows": result.groups.trimmed,
                                **{f"import_dropped_{name}": v for name, v in
                                   zip(("single", "tied", "small"), result.groups.dropped.values(), strict=True)}})
        mlflow.log_metric("rollout_images", rows)
        mlflow.log_param("rollout_fingerprint", fp)
        mlflow.set_tag("data.base_fingerprint", base)
        return rows
