"""``report.html``: one self-contained page, every text from the data escaped."""

from __future__ import annotations

from saeuniv.htmlreport import render, summary_html


def test_html_report_escapes_text_from_the_data():
    pair = {"layer_a": 0, "layer_b": 1, "a": 3, "b": 4, "corr": 0.5,
            "top_tokens_a": "'<b>'", "top_tokens_b": "'&'",
            "context_a": "x <script>alert(1)</script> [[y]]", "context_b": '"q"'}
    html = render("A <i> vs B", "# s & t", {"svcca": "AAAA"}, "BBBB",
                  [("a", 0, {"l0": 3.0, "fvu": 0.25, "dead_fraction": 0.0})], [pair])
    assert "<script>alert" not in html
    assert "x &lt;script&gt;alert(1)&lt;/script&gt; <mark>y</mark>" in html
    assert "&#x27;&lt;b&gt;&#x27;" in html and "&#x27;&amp;&#x27;" in html
    assert "A &lt;i&gt; vs B" in html and "s &amp; t" not in html  # the page has its title
    assert 'src="data:image/png;base64,AAAA"' in html and "&quot;q&quot;" in html
    assert '<td class="num">0.25</td>' in html


def test_summary_markdown_renders_as_html_with_no_markup_from_the_data():
    text = ("## Part\n\n- caveat <img src=x onerror=alert(1)>\n  - nested\n\n"
            "| metric | p |\n|---|---|\n| rsa | 0.01 |\n")
    html = summary_html(text)
    assert "<h4>Part</h4>" in html and "<li>caveat &lt;img" in html and "<img" not in html
    assert "<ul>\n<li>nested</li>\n</ul>" in html
    assert "<table>" in html and "<td>rsa</td>" in html and "<td>0.01</td>" in html


def test_pair_browser_marks_tokens_links_dashboards_and_sorts_inline():
    rows = [{"layer_a": 0, "layer_b": 1, "a": 7, "b": 9, "corr": 0.8, "top_tokens_a": "'x'",
             "top_tokens_b": "'y'", "context_a": "a <b> [[cat]] sat", "context_b": "[[dog]]",
             "neuronpedia_a": "gemma-2-2b/0-gemmascope-res-16k", "neuronpedia_b": None},
            {"layer_a": 2, "layer_b": 1, "a": 1, "b": 2, "corr": 0.3, "top_tokens_a": "",
             "top_tokens_b": "", "context_a": "", "context_b": ""}]
    html = render("t", "s", {}, "C", [], rows)
    assert "a &lt;b&gt; <mark>cat</mark> sat" in html and "<mark>dog</mark>" in html
    assert ('<a href="https://www.neuronpedia.org/gemma-2-2b/0-gemmascope-res-16k/7"'
            in html)
    assert '<td class="num">9</td>' in html  # no id: no link
    assert '<option value="a0-b1">' in html and '<option value="a2-b1">' in html
    assert html.count('<tr data-cell="') == 2
    # one inline script, nothing fetched
    assert html.count("<script>") == 1 and "<script src" not in html and 'src="http' not in html


def test_neuronpedia_ids_of_a_release_and_a_folder(tmp_path):
    import json

    from saeuniv.config import SAERef
    from saeuniv.saes import neuronpedia_id

    release = SAERef(source="release", release="gemma-scope-2b-pt-res-canonical",
                     id="layer_{layer}/width_16k/canonical")
    assert neuronpedia_id(release, 3) == "gemma-2-2b/3-gemmascope-res-16k"
    (tmp_path / "l0").mkdir()
    (tmp_path / "l0" / "cfg.json").write_text(json.dumps({"metadata": {"neuronpedia_id": "m/0-x"}}))
    folder = SAERef(source="folder", path=str(tmp_path / "l{layer}"))
    assert neuronpedia_id(folder, 0) == "m/0-x"
    assert neuronpedia_id(folder, 1) is None  # no cfg.json
    assert neuronpedia_id(SAERef(), 0) is None  # trained here
