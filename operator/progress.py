"""Progress from a running FlowRun's learner: its ``GetStatus`` gRPC call.

The reconciler (``kube_reconciler.py``) asks a ``ProgressSource`` for a running learner's step,
reward and checkpoints. The protocol and the data it returns (``ProgressSource``, ``Progress``,
``RunRef``) are defined with the pure planning code in ``reconcile.py``, which consumes them; this
module holds the operator's default implementation, ``GrpcProgressSource``. Tests feed their own.
"""

from __future__ import annotations

import base64
import logging

from flowlane.api.flowrun import Phase
from flowlane.operator.kube_client import SECRETS, KubeClient
from flowlane.operator.reconcile import Progress, RunRef

logger = logging.getLogger("flowlane.operator")


class GrpcProgressSource:
    """Asks the learner's ``GetStatus`` RPC, with the run's token read from its Secret."""

    def __init__(self, client: KubeClient, timeout_s: float = 3.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        # One Secret read per run, not one per interval; dropped when the learner refuses it.
        self._tokens: dict[tuple[str, str, str], str] = {}

    async def token(self, run: RunRef) -> str | None:
        key = (run.namespace, run.token.secret, run.token.key)
        if key not in self._tokens:
            token = await self._read_token(run)
            if not token:
                return None
            self._tokens[key] = token
        return self._tokens[key]

    async def _read_token(self, run: RunRef) -> str | None:
        secret = await self.client.get(SECRETS, run.namespace, run.token.secret) or {}
        if run.token.key in (secret.get("stringData") or {}):  # not yet converted (emulators)
            return str(secret["stringData"][run.token.key]).strip()
        encoded = (secret.get("data") or {}).get(run.token.key)
        return base64.b64decode(encoded).decode().strip() if encoded else None

    async def __call__(self, run: RunRef) -> Progress | None:
        return await self._ask(run, "GetStatus", self.timeout_s)

    async def checkpoint(self, run: RunRef, timeout_s: float) -> Progress | None:
        """Ask the learner to checkpoint its last completed step now; its status after it (None: no answer)."""
        return await self._ask(run, "Checkpoint", timeout_s)

    async def _ask(self, run: RunRef, method: str, timeout_s: float) -> Progress | None:
        try:
            import grpc.aio

            from flowlane.api import learner_pb2, learner_pb2_grpc
            from flowlane.kit.grpc_common import open_channel
        except ImportError:  # a build without the gRPC stubs: no progress, the run goes on
            return None
        token = await self.token(run)
        if not token:
            return None
        request = learner_pb2.CheckpointRequest() if method == "Checkpoint" else learner_pb2.StatusRequest()
        async with open_channel(run.learner_address, token) as channel:
            try:
                status = await getattr(learner_pb2_grpc.LearnerStub(channel), method)(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                logger.info("learner %s: %s failed: %s", run.learner_address, method, exc.code())
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self._tokens.pop((run.namespace, run.token.secret, run.token.key), None)
                return None
        if status.phase == Phase.PENDING.value:
            # Still starting: a restarted learner serves before it has restored its checkpoint,
            # and its step 0 would make the run's status count backwards.
            return None
        optional = {name: getattr(status, name) if status.HasField(name) else None
                    for name in ("held_out_accuracy", "baseline_accuracy", "validation_accuracy",
                                 "best_validation_accuracy", "staleness")}
        return Progress(
            step=status.step, total_steps=status.total_steps or None, policy_version=status.policy_version,
            reward=status.reward_mean, last_checkpoint=status.last_checkpoint or None,
            mlflow_run_id=status.mlflow_run_id or None, best_checkpoint=status.best_checkpoint or None,
            finished=status.phase == Phase.SUCCEEDED.value,
            worker_policy_versions=dict(status.worker_policy_versions),
            last_weight_sync_seconds=status.last_weight_sync_s if status.HasField("last_weight_sync_s") else None,
            **optional,
        )


# ================================================================================================


__all__ = ["GrpcProgressSource"]
