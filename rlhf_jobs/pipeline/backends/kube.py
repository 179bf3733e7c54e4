"""Kubernetes client plumbing: the API objects the submitter uses, retries, and "absent is fine".

Everything that talks to the API server goes through the four `kubernetes` client objects in
`Clients`; the tests replace them with a fake that raises the client's own `ApiException`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_jobs.core.errors import UserError

T = TypeVar("T")

# HTTP statuses worth retrying: 0 (connection refused/reset/timeout), 429 and the 5xx a busy API server returns.
RETRYABLE_STATUS = frozenset({0, 429, 500, 502, 503, 504})
NOT_FOUND = 404
FORBIDDEN = 403


class ClusterUnavailable(UserError, RuntimeError):
    """No cluster is configured or the cluster is not ready; nothing was created."""


def api_status(error: BaseException) -> int | None:
    """HTTP status of a kubernetes ApiException; 0 for connection errors; None for anything else."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(error, ApiException):
        return int(error.status or 0)
    if isinstance(error, HTTPError | ConnectionError | TimeoutError):
        return 0
    return None


def with_retries(call: Callable[[], T], sleep: Callable[[float], None] = time.sleep, attempts: int = 6,
                 what: str = "Kubernetes API call") -> T:
    """Retry transient API errors (429, 5xx, connection) with exponential backoff; others raise at once."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            status = api_status(err)
            if status not in RETRYABLE_STATUS or attempt == attempts:
                raise
            print(f"   {what}: transient error ({status or 'connection'}), retrying in {delay:.0f}s", flush=True)
            sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def unless_absent(call: Callable[[], T], sleep: Callable[[float], None] = time.sleep,
                  what: str = "Kubernetes API call") -> T | None:
    """`call()` with retries, or None when the object does not exist (404); other errors raise."""
    try:
        return with_retries(call, sleep=sleep, what=what)
    except Exception as err:
        if api_status(err) == NOT_FOUND:
            return None
        raise


def field(obj: Any, name: str) -> Any:
    """Attribute of a kubernetes model object, or key of a dict (the fake API returns dicts)."""
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


@dataclass
class Clients:
    custom: Any
    core: Any
    apiext: Any
    authz: Any
    batch: Any = None

    @classmethod
    def from_environment(cls) -> Clients:
        """In-cluster config when running in a pod (a ServiceAccount token is mounted), else the local kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, FileNotFoundError, TypeError) as err:
                raise ClusterUnavailable(
                    f"no Kubernetes cluster configured (no in-cluster config, no kubeconfig): {err}"
                ) from None
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), client.ApiextensionsV1Api(),
                   client.AuthorizationV1Api(), client.BatchV1Api())
