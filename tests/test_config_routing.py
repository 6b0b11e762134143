"""Configuration errors name the key; rules match as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import ConfigError, Rule, load_config, parse_config
from dicomnode.routing import matches, orientation, route

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configuration_loads() -> None:
    cfg = load_config(ROOT / "conf" / "node.yaml")
    assert cfg.node.ae_title == "DICOMNODE" and cfg.destinations["pacs"].port == 4242
    assert cfg.results.lordosis_thresholds_deg == (39, 53) == parse_config({}).results.lordosis_thresholds_deg


@pytest.mark.parametrize("data,words", [
    ({"node": {"port": 104, "colour": "red"}}, "unknown key 'node.colour'"),
    ({"nodes": {}}, "unknown key 'nodes'"),
    ({"node": {"ae_title": "TOO_LONG_FOR_AN_AE"}}, "not a valid AE title"),
    ({"node": {"port": 70000}}, "node.port"),
    ({"rules": [{"name": "r", "pipelines": ["x"], "send_to": ["nowhere"]}]}, "sends to 'nowhere'"),
    ({"destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 104, "colour": "red"}}}, "unknown key"),
    ({"results": {"lordosis_thresholds_deg": [53, 39]}}, "results.lordosis_thresholds_deg: .*the first smaller"),
    ({"results": {"lordosis_thresholds_deg": [39]}}, "results.lordosis_thresholds_deg"),
])
def test_bad_configuration_is_refused_with_the_key(data: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_config(data, "node.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


SAG = {"Modality": "MR", "SeriesDescription": "SAG T2 TSE", "SeriesNumber": "3", "MagneticFieldStrength": "1.5",
       "ImageOrientationPatient": ["0", "1", "0", "0", "0", "-1"]}
AX = {**SAG, "SeriesDescription": "AX T2", "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"]}


def rule(name: str, match: dict) -> Rule:
    return Rule(name=name, match=match, pipelines=["p"])


def test_conditions() -> None:
    assert matches(rule("a", {"Modality": "MR", "SeriesDescription": "(?i)sag"}), SAG)
    assert not matches(rule("a", {"Modality": "CT"}), SAG)
    assert not matches(rule("a", {"Modality": "M"}), SAG)  # plain strings are exact
    assert matches(rule("a", {"SeriesNumber": 3}), SAG)
    assert matches(rule("a", {"MagneticFieldStrength": {"min": 1.0, "max": 2.0}}), SAG)
    assert not matches(rule("a", {"MagneticFieldStrength": {"min": 2.0}}), SAG)
    assert matches(rule("a", {"SeriesDescription": {"regex": "T2"}}), SAG)
    assert matches(rule("a", {"orientation": "sagittal"}), SAG) and matches(rule("a", {"orientation": "axial"}), AX)
    assert not matches(rule("a", {"BodyPartExamined": "LSPINE"}), SAG)  # absent attribute: no match
    assert orientation(["1", "0"]) is None


def test_first_or_all_matches() -> None:
    rules = [rule("sag", {"orientation": "sagittal"}), rule("mr", {"Modality": "MR"}), rule("ct", {"Modality": "CT"})]
    assert [r.name for r in route(rules, SAG, "first")] == ["sag"]
    assert [r.name for r in route(rules, SAG, "all")] == ["sag", "mr"]
    assert [r.name for r in route(rules, AX, "all")] == ["mr"]
    assert route(rules, {"Modality": "US"}, "all") == []
