"""Session planning and the sign-in throttle as plain function calls: no servers."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest
from litestar.exceptions import ClientException

from swarmtrain.common.events import Strategy
from swarmtrain.common.models import CnnSpec
from swarmtrain.common.settings import Settings
from swarmtrain.common.strategies import RULES
from swarmtrain.gateway.sessions.planning import check_against_dataset, plan_session
from swarmtrain.gateway.sessions.schemas import HyperparametersIn, ModelIn, SessionIn
from swarmtrain.gateway.throttle import FailureWindow, SignInThrottle

SETTINGS = Settings(jwt_secret="x" * 32)
HP = HyperparametersIn(epochs=2, batch_size=32, lr=0.01)


def test_every_strategy_of_the_contract_has_its_request_rules() -> None:
    assert set(RULES.list()) == set(get_args(Strategy))


def test_a_model_that_does_not_fit_the_dataset_is_refused_naming_the_model() -> None:
    plan = plan_session(
        SessionIn(dataset_id="d", num_peers=1, hyperparameters=HP, model=ModelIn(kind="cnn", input_shape=[1, 2, 2])),
        SETTINGS,
    )
    with pytest.raises(ClientException, match="model: input_shape 1x2x2 holds 4 values but the data has 5"):
        check_against_dataset(plan, rows=100, features=5, classes=2, settings=SETTINGS)


def test_sweep_takes_a_cnn_and_fedavg_expands_its_one_hyperparameter_set() -> None:
    cnn = ModelIn(kind="cnn", input_shape=[1, 8, 8])
    plan = plan_session(SessionIn(dataset_id="d", num_peers=2, hyperparameters=[HP, HP], model=cnn), SETTINGS)
    assert plan.model == CnnSpec(hidden=[128, 64], input_shape=[1, 8, 8], channels=[16, 32])
    plan = plan_session(
        SessionIn(dataset_id="d", num_peers=3, hyperparameters=HP, strategy="fedavg", rounds=5), SETTINGS
    )
    assert (plan.strategy, plan.rounds, plan.on_peer_failure, len(plan.hyperparameters)) == ("fedavg", 5, "reassign", 3)
    check_against_dataset(plan, rows=100, features=4, classes=2, settings=SETTINGS)


def test_fedavg_epochs_cap_counts_every_round() -> None:
    settings = msgspec.structs.replace(SETTINGS, max_epochs=100)
    data = SessionIn(dataset_id="d", num_peers=1, hyperparameters=HP, strategy="fedavg", rounds=50)
    assert plan_session(data, settings).rounds == 50
    with pytest.raises(ClientException, match="at most 2 per round"):
        plan_session(
            msgspec.structs.replace(data, hyperparameters=HyperparametersIn(epochs=3, batch_size=8, lr=0.1)), settings
        )


# ------------------------------------------------------------------ throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_refuses_at_the_limit_until_the_oldest_failure_ages_out() -> None:
    clock = Clock()
    window = FailureWindow(3, 60.0, clock=clock)
    for _ in range(3):
        assert window.retry_after("k") is None
        window.failed("k")
        clock.now += 10
    assert window.retry_after("k") == pytest.approx(30.0)  # the first failure (t=1000) leaves at 1060
    clock.now = 1060.0
    assert window.retry_after("k") is None
    window.clear("k")
    assert len(window) == 0


def test_window_forgets_the_oldest_keys_past_its_bound() -> None:
    window = FailureWindow(1, 60.0, max_keys=2, clock=Clock())
    for key in ("a", "b", "c"):
        window.failed(key)
    assert len(window) == 2
    assert window.retry_after("a") is None and window.retry_after("c") is not None


def test_signin_throttle_counts_email_and_address_and_success_clears_the_email() -> None:
    clock = Clock()
    settings = msgspec.structs.replace(
        SETTINGS, signin_max_failures=2, signin_max_failures_per_address=3, signin_window_s=100
    )
    throttle = SignInThrottle(settings, clock=clock)
    throttle.failed("a@x.io", "1.1.1.1")
    throttle.succeeded("a@x.io")
    throttle.failed("a@x.io", "1.1.1.1")
    assert throttle.retry_after("a@x.io", "2.2.2.2") is None
    throttle.failed("a@x.io", "2.2.2.2")
    assert throttle.retry_after("a@x.io", "3.3.3.3") == pytest.approx(100.0)
    assert throttle.retry_after("b@x.io", "1.1.1.1") is None
    throttle.failed("b@x.io", "1.1.1.1")
    assert throttle.retry_after("c@x.io", "1.1.1.1") == pytest.approx(100.0)  # three from 1.1.1.1
