"""The one Settings object (env prefix TUNERY_), built at the entry point and passed down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """Per-user data dir: $XDG_DATA_HOME/tunery or ~/.local/share/tunery."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tunery"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    db_url: str | None = None  # default: sqlite:///{data_dir}/tunery.db
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # TUNERY_API_KEYS=k1,k2
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # worker torch threads; default: all cores
    api_threads: int | None = None  # API process torch threads (decode); default: all cores
    preload: bool = True  # `tunery serve` loads the default base model at start (API + worker)
    max_loaded_adapters: int = 128  # tuned adapters kept in memory per base model (LRU)
    # Decode forward: fast (batched, PyTorch) | fast-int8 | reference | llama-cpp (needs the
    # `llamacpp` extra; one request at a time)
    decode_backend: Literal["fast", "fast-int8", "reference", "llama-cpp"] = "fast"
    prompt_lookup: bool = True  # llama-cpp greedy decoding verifies prompt-lookup drafts
    # fast decode steps attend with a C kernel (built with the system compiler; off: torch)
    native_kernels: bool = True
    workers: int = 1  # worker processes `tunery serve` starts
    # How far the workers' CPU priority is under the API's (0-19, added to its `nice`): on shared
    # cores, requests keep their latency while a job trains, and the API loads its model first.
    worker_nice: int = Field(default=10, ge=0, le=19)
    lease_seconds: float = 30.0
    max_running_jobs_per_key: int = 2
    max_job_attempts: int = 3  # a job whose worker died this many times is FAILED
    max_request_bytes: int = 64 * 1024 * 1024

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'tunery.db'}"

    @property
    def models_dir(self) -> Path:
        """Converted base models (the GGUF → safetensors cache) and the registry file."""
        return self.data_dir / "base_models"

    @property
    def adapters_dir(self) -> Path:
        """One folder per tuned model: checkpoints and the final PEFT adapter."""
        return self.data_dir / "tuned_models"
