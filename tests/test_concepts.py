"""Concept-set files: the shipped reference set, user sets, and what is refused."""

from __future__ import annotations

import pytest

from saeuniv.concepts import load_concepts
from saeuniv.config import ConfigError


def test_the_reference_set_has_eight_categories_with_multi_word_phrases():
    c = load_concepts("reference")
    assert c.categories == ("time", "calendar", "people_roles", "nature", "emotions",
                            "month_names", "countries", "biology")
    every = [p for ps in c.phrases for p in ps]
    for phrase in ("New York", "United States", "last week", "red blood cell"):
        assert phrase in every
    assert all(any(len(p.split()) > 1 for p in ps) for ps in c.phrases)


@pytest.mark.parametrize("text, message", [
    ("categories: {}", "non-empty 'categories'"),
    ("categories: {time: {keywords: []}}", "category 'time' needs a non-empty list"),
    ("categories: {time: {words: [a]}}", "unknown key"),
    ("categories: {time: [today, today]}", "lists \\['today'\\] more than once"),
    ("categories: {time: [1, today]}", "not text"),
    ("categories: {time: [a]}\nextra: 1", "unknown key"),
    ("categories: [", "not valid YAML"),
    ("!!python/object/apply:os.system [echo]", r"tag 'tag:yaml.org,2002:python/object/apply:"
                                               r"os.system' .*is not allowed"),
])
def test_bad_concept_sets_are_refused_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_concepts(str(path))


def test_a_missing_concept_set_names_what_was_tried_and_the_shipped_sets(tmp_path):
    with pytest.raises(ConfigError, match=r"no concept-set file .*'reference'"):
        load_concepts("nonexistent-set")


def test_a_user_concept_set_loads_with_plain_lists(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ncategories:\n  ships: [harpoon, white   whale]\n")
    c = load_concepts(str(path))
    assert c.name == "mine" and c.phrases == (("harpoon", "white whale"),)
