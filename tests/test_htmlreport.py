"""``report.html``: one self-contained page, every text from the data escaped."""

from __future__ import annotations

from saeuniv.htmlreport import render


def test_html_report_escapes_text_from_the_data():
    pair = {"layer_a": 0, "layer_b": 1, "a": 3, "b": 4, "corr": 0.5,
            "top_tokens_a": "'<b>'", "top_tokens_b": "'&'",
            "context_a": "x <script>alert(1)</script> [[y]]", "context_b": '"q"'}
    html = render("A <i> vs B", "# s & t", {"svcca": "AAAA"}, "BBBB",
                  [("a", 0, {"l0": 3.0, "fvu": 0.25, "dead_fraction": 0.0})], [pair])
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; [[y]]" in html
    assert "&#x27;&lt;b&gt;&#x27;" in html and "&#x27;&amp;&#x27;" in html
    assert "A &lt;i&gt; vs B" in html and "# s &amp; t" in html
    assert 'src="data:image/png;base64,AAAA"' in html and "&quot;q&quot;" in html
    assert '<td class="num">0.25</td>' in html
