"""Hand-worked checks of lit_rlhf.kl_control."""

import pytest
import torch

from lit_rlhf.kl_control import AdaptiveKLController, FixedKLController


def test_fixed_controller_keeps_beta():
    controller = FixedKLController(0.1)
    controller.update(kl=50.0, n_steps=1000)
    assert controller.beta == 0.1


def test_adaptive_controller_above_target_is_clipped_at_plus_0_2():
    # kl/target − 1 = 12/6 − 1 = 1, clipped to 0.2: β = 0.1·(1 + 0.2·256/10000) = 0.1·1.00512 = 0.100512.
    controller = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    controller.update(kl=12.0, n_steps=256)
    assert controller.beta == pytest.approx(0.100512, abs=1e-12)


def test_adaptive_controller_below_target():
    # kl/target − 1 = 5.4/6 − 1 = −0.1 (inside the clip): β = 0.1·(1 − 0.1·1000/10000) = 0.1·0.99 = 0.099.
    controller = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    controller.update(kl=torch.tensor(5.4), n_steps=1000)
    assert controller.beta == pytest.approx(0.099, abs=1e-9)
    # kl = 0 → error −1 clipped to −0.2: β = 0.099·(1 − 0.2·0.1) = 0.099·0.98 = 0.09702.
    controller.update(kl=0.0, n_steps=1000)
    assert controller.beta == pytest.approx(0.09702, abs=1e-9)


def test_adaptive_controller_state_dict_round_trip_continues_identically():
    controller = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    for kl in (12.0, 3.0, 7.5):
        controller.update(kl, n_steps=512)

    resumed = AdaptiveKLController(init_beta=0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.beta == controller.beta
    for kl in (9.0, 1.0):
        controller.update(kl, n_steps=512)
        resumed.update(kl, n_steps=512)
        assert resumed.beta == controller.beta


def test_fixed_controller_state_dict_round_trip():
    resumed = FixedKLController(0.5)
    resumed.load_state_dict(FixedKLController(0.2).state_dict())
    assert resumed.beta == 0.2


def test_adaptive_controller_rejects_non_positive_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_beta=0.1, target=0.0, horizon=10000)
