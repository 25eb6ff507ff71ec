"""The MLflow model registry entry of a trained adapter: a pyfunc that renders images from prompts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from gdro_core.params import Params, parse_params, section_dict

REQUIREMENTS = ["torch", "diffusers", "transformers", "peft", "safetensors", "pandas", "mlflow"]


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Base model + GDRO adapter; ``predict(prompts)`` returns one uint8 image array per prompt."""

    def load_context(self, context) -> None:
        from gdro_core.models import load_flow_model
        from gdro_core.models.lora import load_adapter
        from gdro_core.tasks import world_of

        self.params = parse_params(json.loads(Path(context.artifacts["params"]).read_text()), "registered params")
        source = self.params.model.source
        base = context.artifacts.get("base", "") if source == "builtin" else source
        self.model = load_flow_model(source, base, world_of(self.params), self.params.model.device, self.params.model.dtype)
        load_adapter(self.model.transformer, Path(context.artifacts["adapter"]))

    def predict(self, context, model_input, params: dict | None = None) -> list[np.ndarray]:
        from gdro_core.models.sampling import sample

        prompts = list(model_input["prompt"] if isinstance(model_input, pd.DataFrame) else model_input)
        seed = int((params or {}).get("seed", self.params.evaluate.seed))
        cfg = self.params.sampler
        cond, null = self.model.encode(prompts), self.model.encode([""])
        latents = sample(self.model, cond, null, [seed + i for i in range(len(prompts))], cfg.steps, cfg.guidance)
        return [np.asarray(im) for im in self.model.decode(latents)]


def log_adapter_model(params: Params, adapter_dir: Path, base_dir: Path, registered_name: str | None):
    """Log the adapter (and, for the built-in model, its base) as a pyfunc; register it when named."""
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params.model_dump(), indent=2))
        artifacts = {"adapter": str(adapter_dir), "params": str(params_file)}
        if params.model.source == "builtin":
            artifacts["base"] = str(base_dir)
        return mlflow.pyfunc.log_model(
            name="adapter",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts=artifacts,
            pip_requirements=REQUIREMENTS,
            registered_model_name=registered_name,
            code_paths=[str(Path(__file__).parent)],
        )


def version_tags(params: Params, metrics: dict[str, dict[str, float]], data: dict[str, str]) -> dict[str, str]:
    """Tags of a registered version: its params (``param.*``), evaluate metrics (``metric.*``) and data version."""
    tags = {f"param.{k}": str(v) for k, v in section_dict(params, "train", "evaluate", "judge").items()}
    tags["param.model.source"] = params.model.source
    tags.update({f"metric.{k}.{m}": f"{float(v):.6g}" for k, d in metrics.items() for m, v in d.items()})
    tags.update(data)
    return tags


def version_description(params: Params, metrics: dict[str, dict[str, float]]) -> str:
    t, trained = params.train, metrics.get("trained", {})
    scores = ", ".join(f"{k} {trained[k]:.4g}" for k in ("reward", "corrected") if k in trained)
    return f"{t.objective} beta={t.beta:g} tau={t.tau:g} k={t.group_size} gamma={t.gamma:g} lr={t.lr:g} " \
           f"steps={t.steps} seed={t.seed}: trained {scores}"


def register_adapter(
    params: Params, adapter_dir: Path, base_dir: Path, metrics: dict[str, dict[str, float]], data: dict[str, str]
):
    """Log and register the adapter in the active run; tag the new version with params, metrics and data version.

    Returns the registered ``ModelVersion`` (``None`` when ``tracking.registered_model`` is empty).
    """
    name = params.tracking.registered_model
    mlflow.set_tags(data)
    info = log_adapter_model(params, adapter_dir, base_dir, name or None)
    if not name:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in version_tags(params, metrics, data).items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=version_description(params, metrics))
    return client.get_model_version(name, version)
