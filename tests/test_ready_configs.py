"""The ready configs in ``configs/``, checked offline: each loads, each ladder reads, and every
pretrained SAE a config names (release and id, for every layer it compares) is listed by the
installed sae-lens, for a model of the depth the config assumes."""

from pathlib import Path

import pytest

from saeuniv.config import SAERef, load_config
from saeuniv.ladder import load_ladder
from saeuniv.models import ModelInfo
from saeuniv.saes import check_ref, release_lookup

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LADDERS = sorted(CONFIGS.glob("ladder-*.yaml"))
MAINS = sorted(set(CONFIGS.glob("*.yaml")) - set(LADDERS))

# layers and width of the Hub-only models, where transformer-lens needs the Hub to say them
# (published: Pythia and GPT-2 model cards)
HUB_SHAPES = {"pythia-70m-deduped": (6, 512), "pythia-160m-deduped": (12, 768),
              "pythia-410m-deduped": (24, 1024), "gpt2": (12, 768),
              "gpt2-medium": (24, 1024)}


def shape(model: dict) -> tuple[int, int]:
    """(n_layers, d_model) of a transformer-lens model, without the Hub where possible."""
    if model["name"] in HUB_SHAPES:
        return HUB_SHAPES[model["name"]]
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config(model["name"])
    return cfg.n_layers, cfg.d_model


def layers_of(value, n_layers: int) -> list[int]:
    if value == "all":
        return list(range(n_layers))
    if isinstance(value, str):
        return list(range(0, n_layers, int(value.split(":")[1])))
    return list(value)


def check_release(model: dict, sae: dict, layers, where: str) -> None:
    n_layers, d_model = shape(model)
    wanted = layers_of(layers, n_layers)
    assert all(0 <= layer < n_layers for layer in wanted), (where, wanted, n_layers)
    check_ref(SAERef(**sae), ModelInfo(model["name"], n_layers, d_model), wanted, where)


@pytest.mark.parametrize("path", MAINS, ids=lambda p: p.name)
def test_ready_main_configs_load_and_name_listed_saes(path):
    cfg = load_config(path).to_dict()
    for side in "ab":
        if cfg[f"sae_{side}"]["source"] == "release":
            check_release(cfg[f"model_{side}"], cfg[f"sae_{side}"], cfg[f"layers_{side}"],
                          f"{path.name} side {side}")


@pytest.mark.parametrize("path", LADDERS, ids=lambda p: p.name)
def test_ready_ladders_load_and_name_listed_saes(path):
    ladder = load_ladder(path)
    assert len(ladder.rungs) >= 3 and ladder.pairs()
    sizes = [r.params for r in ladder.rungs]
    assert None in sizes or sizes == sorted(sizes), "models are listed smallest first"
    for rung in ladder.rungs:
        if rung.sae["source"] == "release":
            check_release(rung.model, rung.sae, rung.layers, f"{path.name} {rung.label}")
    for i, j in ladder.pairs():  # every pair is a valid main config
        cfg = ladder.config(i, j)
        assert (cfg.model_a.name, cfg.model_b.name) == (ladder.rungs[i].model["name"],
                                                        ladder.rungs[j].model["name"])


def test_gemma_scope_2_ladder_uses_layers_every_size_has():
    """Each size's layers are exactly those with a 16k residual SAE in sae-lens's directory."""
    ladder = load_ladder(CONFIGS / "ladder-gemma-scope-2.yaml")
    for rung in ladder.rungs:
        listed = {int(sae_id.split("_")[1]) for sae_id in release_lookup(
            rung.sae["release"]).saes_map if "_width_16k_l0_medium" in sae_id}
        assert sorted(listed) == rung.layers, rung.label
