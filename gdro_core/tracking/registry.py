"""The MLflow model registry entry of a trained adapter: a pyfunc that renders images from prompts.

The registered model records the base it needs (family, source, fingerprint: ``base.json`` beside the
adapter, and ``base.*`` version tags) and refuses to load onto another. ``predict`` takes ``seed``,
``steps`` and ``guidance`` as params, declared in its signature; any other param is refused (MLflow alone would
drop it with a warning and render with the defaults).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from gdro_core.params import Params, parse_params, section_dict
from gdro_core.tracking.runs import ROUND_TAG

REQUIREMENTS = ["torch", "diffusers", "transformers", "peft", "safetensors", "pandas", "mlflow"]


PREDICT_PARAMS = ("seed", "steps", "guidance")


def predict_params(params: Params) -> dict[str, int | float]:
    """The ``predict`` params a user may set, with their defaults from the registered params."""
    return dict(zip(PREDICT_PARAMS, (params.evaluate.seed, params.sampler.steps, params.sampler.guidance), strict=True))


def check_predict_params(params: dict | None) -> None:
    """Refuse a ``predict`` param that is not ``seed``, ``steps`` or ``guidance``, naming it and the accepted ones."""
    unknown = sorted(str(k) for k in (params or {}) if k not in PREDICT_PARAMS)
    if unknown:
        from mlflow.exceptions import MlflowException

        raise MlflowException.invalid_parameter_value(
            f"unknown predict param(s) {', '.join(repr(k) for k in unknown)}: this model accepts "
            f"{', '.join(PREDICT_PARAMS)} (e.g. params={{'seed': 7}}); nothing was rendered"
        )


def _strict_params_schema() -> None:
    """MLflow's ``PyFuncModel.predict`` drops params its signature does not declare (with only a warning) before
    ``predict`` sees them, so a mistyped ``sed`` would render default-seed images. Wrap its schema check so that, for
    a params schema of exactly this model's params, an undeclared param is an error instead. Installed once, when
    this module is imported (the registered model's code imports it on load)."""
    import importlib

    pyfunc = importlib.import_module("mlflow.pyfunc")  # the module itself: ``mlflow.pyfunc`` is a lazy proxy

    enforce = pyfunc._enforce_params_schema
    if getattr(enforce, "_gdro_strict", False):
        return

    def strict(params, schema):
        if isinstance(params, dict) and schema is not None and \
                {p.name for p in getattr(schema, "params", [])} == set(PREDICT_PARAMS):
            check_predict_params(params)
        return enforce(params, schema)

    strict._gdro_strict = True
    pyfunc._enforce_params_schema = strict


_strict_params_schema()


def signature(params: Params):
    """Input: prompt strings (a list, or a one-column frame); params: ``seed`` (image i starts from the noise of
    seed + i: a one-prompt call with that seed gives it to within one grey level), ``steps``,
    ``guidance``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    types = {"seed": "long", "steps": "long", "guidance": "double"}
    specs = [ParamSpec(k, types[k], v) for k, v in predict_params(params).items()]
    return ModelSignature(inputs=Schema([ColSpec("string")]), params=ParamSchema(specs))


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Base model + GDRO adapter; ``predict(prompts)`` returns one uint8 image array per prompt."""

    def load_context(self, context) -> None:
        from gdro_core.models import load_model
        from gdro_core.models.lora import WEIGHTS

        self.params = parse_params(json.loads(Path(context.artifacts["params"]).read_text()), "registered params")
        base = context.artifacts.get("base", "") if self.params.model.source == "builtin" else self.params.model.source
        adapter = Path(context.artifacts["adapter"])
        if not (adapter / WEIGHTS).is_file():  # `gdro train` cannot bring a registered version back
            raise FileNotFoundError(
                f"this registered version's adapter weights are gone (no {WEIGHTS} in {adapter}): register the "
                "adapter again (`gdro evaluate`, or `dvc repro --force evaluate`) or retire the version; `gdro compare` "
                "names the broken version and the command that deletes it"
            )
        self.model = load_model(self.params, base)
        self.model.load_adapter(adapter)  # refuses a base with another fingerprint

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[np.ndarray]:
        """``model_input``: the prompts, as the signature's one string column (a plain list works too). The hint is
        one MLflow infers no schema from: the logged signature is the schema, and MLflow stops asking for hints."""
        from gdro_core.models.sampling import sample

        if isinstance(model_input, pd.DataFrame):
            model_input = model_input["prompt"] if "prompt" in model_input else model_input.iloc[:, 0]
        prompts = [str(p) for p in model_input]
        check_predict_params(params)
        chosen = {**predict_params(self.params), **{k: v for k, v in (params or {}).items() if v is not None}}
        seed, steps, guidance = int(chosen["seed"]), int(chosen["steps"]), float(chosen["guidance"])
        if steps < 1 or guidance < 0:
            raise ValueError(f"predict params need steps >= 1 and guidance >= 0 (got {steps=}, {guidance=})")
        cond, null = self.model.encode(prompts), self.model.encode([""])
        latents = sample(self.model, cond, null, [seed + i for i in range(len(prompts))], steps, guidance)
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
            signature=signature(params),
            code_paths=[str(Path(__file__).parent)],
        )


IDENTIFYING_PARAMS = ("train.objective", "model.source")
"""The params a version's tags repeat: what it is and which base it needs. Every other param and metric is on the
source run the version links to (``gdro compare`` reads them there), so MLflow's model page stays readable."""


def version_tags(params: Params, metrics: dict[str, dict[str, float]], data: dict[str, str],
                 base: dict[str, str] | None = None) -> dict[str, str]:
    """Tags of a registered version: what identifies and ranks it. The objective and model source
    (``param.*``), the base it needs (``base.*``), its data version (``data.*``), the metrics the registry ranks by
    (``metric.*``, ``registry.rank_by``) and the judge behind its corrected score (``corrected_score_judge``)."""
    flat = section_dict(params, "train", "model")
    tags = {f"param.{k}": str(flat[k]) for k in IDENTIFYING_PARAMS}
    tags.update({f"base.{k}": str(v) for k, v in (base or {}).items()})
    for name in params.registry.rank_by:
        section, _, metric = name.partition(".")
        if metric in metrics.get(section, {}):
            tags[f"metric.{name}"] = f"{float(metrics[section][metric]):.6g}"
    if "corrected_score_judge" in metrics.get("judge", {}):  # which judge the metric.*.corrected rest on
        tags["corrected_score_judge"] = str(metrics["judge"]["corrected_score_judge"])
    tags.update(data)
    return tags


def version_description(params: Params, metrics: dict[str, dict[str, float]]) -> str:
    t, trained = params.train, metrics.get("trained", {})
    scores = ", ".join(f"{k} {trained[k]:.4g}" for k in ("reward", "corrected") if k in trained)
    return f"{t.objective} beta={t.beta:g} tau={t.tau:g} k={t.group_size} gamma={t.gamma:g} lr={t.lr:g} " \
           f"steps={t.steps} seed={t.seed}: trained {scores}"


def register_adapter(
    params: Params, adapter_dir: Path, base_dir: Path, metrics: dict[str, dict[str, float]], data: dict[str, str],
    round: int = 1,
):
    """Log and register the adapter in the active run; tag the new version with params, metrics and data version
    (and a later round's version with ``gdro.round``).

    Returns the registered ``ModelVersion`` (``None`` when ``tracking.registered_model`` is empty).
    """
    from gdro_core.data.store import read_json
    from gdro_core.models.family import BASE_FILE

    name = params.tracking.registered_model
    base_file = Path(adapter_dir) / BASE_FILE
    base = read_json(base_file) if base_file.is_file() else {}
    mlflow.set_tags(data)
    mlflow.set_tags({f"base.{k}": str(v) for k, v in base.items()})
    info = log_adapter_model(params, adapter_dir, base_dir, name or None)
    if not name:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = version_tags(params, metrics, data, base) | ({ROUND_TAG: str(round)} if round > 1 else {})
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    description = version_description(params, metrics)
    if round > 1:
        description = f"round {round}: {description}"
    client.update_model_version(name, version, description=description)
    return client.get_model_version(name, version)
