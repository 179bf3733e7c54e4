"""Hub model ids, checked on the driver before anything loads: fail in seconds, naming the config key.

Without this, an unreachable hub costs about a minute of retries inside `from_pretrained`, and its
error names neither the config key nor offline mode. No torch or transformers import here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_jobs.core.errors import ModelError
from rlhf_jobs.core.loading import build_hint


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


OFFLINE_HINT = (
    "point it at a local model directory, or download the model where there is network (hf download NAME) "
    "and set HF_HUB_OFFLINE=1 to read it from the cache (huggingface_hub's HF_HUB_ETAG_TIMEOUT and "
    "HF_HUB_DOWNLOAD_TIMEOUT set its network timeouts; from_pretrained(local_files_only=True) never goes online)"
)


def check_hub_model(name: str, key: str, timeout: float = 5.0) -> None:
    """A hub model id that is cached (offline mode) or that the hub answers for, within `timeout` s.

    Without this, an unreachable hub costs about a minute of retries inside from_pretrained and
    the error names neither the config key nor offline mode.
    """
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)
    here = f"not a local directory (none at {Path(name).resolve()})"
    if _offline():
        if not cached:
            raise ModelError(
                f"{key}: {name!r} is {here} and not in the Hugging Face cache, and offline mode is on "
                f"(HF_HUB_OFFLINE); {OFFLINE_HINT.replace('NAME', name)}"
            )
        return
    try:
        huggingface_hub.model_info(name, timeout=timeout)
    except GatedRepoError:
        return  # reachable; from_pretrained says what access is missing
    except RepositoryNotFoundError:
        raise ModelError(
            f"{key}: {name!r} is {here} and not a model on the Hugging Face Hub (or a private one: set HF_TOKEN)"
        ) from None
    except Exception as err:  # connection, DNS, timeout, 5xx: the hub is out of reach
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if cached:
            raise ModelError(
                f"{key}: the Hugging Face Hub is unreachable ({reason}); {name!r} is in the local cache: "
                "set HF_HUB_OFFLINE=1 to use it without the network"
            ) from None
        raise ModelError(
            f"{key}: {name!r} is {here}, and as a Hugging Face Hub id it cannot be fetched: the hub is "
            f"unreachable ({reason}); {OFFLINE_HINT.replace('NAME', name)}{build_hint(name)}"
        ) from None
