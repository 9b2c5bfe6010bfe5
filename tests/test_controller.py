import pytest

from grace import AdaptiveIBController


def test_trajectory_by_hand():
    c = AdaptiveIBController(tau=0.35, eta=0.1, beta_init=1.0, beta_min=0.1, beta_max=5.0, ema_decay=0.5)
    # step 1: ema = 1.35 (first value), beta = 1 + 0.1 * (1.35 - 0.35) = 1.1
    assert c.update(1.35) == pytest.approx(1.1)
    # step 2: ema = 0.5 * 1.35 + 0.5 * 0.15 = 0.75, beta = 1.1 + 0.1 * 0.4 = 1.14
    assert c.update(0.15) == pytest.approx(1.14)
    assert c.ema == pytest.approx(0.75)
    # step 3: ema = 0.5 * 0.75 + 0.5 * (-0.45) = 0.15, beta = 1.14 + 0.1 * (-0.2) = 1.12
    assert c.update(-0.45) == pytest.approx(1.12)


def test_projection_onto_bounds_and_fixed_beta():
    c = AdaptiveIBController(tau=0.0, eta=10.0, beta_init=1.0, beta_max=2.0)
    assert c.update(5.0) == 2.0
    c = AdaptiveIBController(tau=10.0, eta=10.0, beta_init=1.0, beta_min=0.1)
    assert c.update(0.0) == 0.1
    fixed = AdaptiveIBController(adaptive=False, beta_init=0.7)
    for v in (3.0, 0.0, 9.0):
        assert fixed.update(v) == 0.7
    assert fixed.ema is not None


def test_state_round_trip_and_errors():
    a = AdaptiveIBController()
    for v in (0.9, 0.4, 0.2):
        a.update(v)
    b = AdaptiveIBController()
    b.load_state_dict(a.state_dict())
    assert b.update(0.5) == a.update(0.5)
    with pytest.raises(ValueError, match="not finite"):
        a.update(float("nan"))
    with pytest.raises(ValueError, match="beta_init"):
        AdaptiveIBController(beta_init=9.0)
