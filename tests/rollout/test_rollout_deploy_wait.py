"""When a rollout stops waiting for a version's app: running, failed, unschedulable (one line
naming the resource and the fix), or past deploy_timeout_s."""

from __future__ import annotations

from serve_app.rollout.deploy_wait import FIX, AppSnapshot, deploy_verdict

# Serve 2.60's own message for a replica no node can host (deployment_state.py)
PENDING = (
    "Deployment 'router' in application 'moeserve--v2' has 1 replicas that have taken more "
    "than 30s to be scheduled. This may be due to waiting for the cluster to auto-scale or for "
    'a runtime environment to be installed. Resources required for each replica: {"CPU": 64.0}, '
    'total resources available: {"CPU": 2.0}. Use `ray status` for more details.'
)


def test_running_is_ready():
    v = deploy_verdict(AppSnapshot("RUNNING"), 1.0, 600)
    assert v.ready and v.error is None and not v.waiting


def test_deploying_waits_until_the_timeout():
    snap = AppSnapshot("DEPLOYING", deployment_messages=("",))
    assert deploy_verdict(snap, 599.0, 600).waiting
    assert deploy_verdict(None, 5.0, 600).waiting  # not created yet
    v = deploy_verdict(snap, 600.0, 600)
    assert v.error == "not running after 600 s (rollout.deploy_timeout_s), Serve says DEPLOYING"


def test_unschedulable_replicas_fail_at_once_naming_resource_and_fix():
    v = deploy_verdict(AppSnapshot("DEPLOYING", deployment_messages=(PENDING,)), 31.0, 600)
    assert v.error == (
        'its router replicas need {"CPU": 64.0} each and the cluster has {"CPU": 2.0} free: ' + FIX
    )
    assert "\n" not in v.error and "router.num_cpus" in v.error


def test_serve_failure_is_reported_on_one_line():
    snap = AppSnapshot("DEPLOY_FAILED", "The deployment failed to start\n  Traceback: boom")
    v = deploy_verdict(snap, 3.0, 600)
    assert v.error == "Serve reports DEPLOY_FAILED: The deployment failed to start Traceback: boom"
