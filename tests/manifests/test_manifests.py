"""The shipped Serve config parses with Serve's own schema, and its args with AppConfig."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppConfig

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def test_serve_config_is_valid():
    raw = yaml.safe_load((MANIFESTS / "serve.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(raw)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(raw)
    )
    (app,) = schema.applications
    assert app.import_path == "serve_app.builder:build_app"
    cfg = AppConfig.model_validate(app.args)
    assert cfg.engine_config().max_num_seqs == 64


def test_app_config_rejects_typos():
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"model": "m", "engine": {"max_num_seq": 4}})
