"""The README is held to the files behind it: every results table is generated from `results/` and
`studies/` (tools/readme_tables.py), and a measured number in the prose needs a generated block or a
cited source."""

from __future__ import annotations

import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import readme_tables  # noqa: E402

README = (ROOT / "README.md").read_text()


def test_every_generated_table_is_what_its_files_give():
    blocks = readme_tables.BLOCK.findall(README)
    assert blocks, "the README has no generated results block"
    assert readme_tables.differing_blocks(README) == []


def test_no_measured_number_in_the_prose_lacks_a_file_or_a_source():
    assert readme_tables.unbacked_numbers(README) == []


def test_a_number_edited_by_hand_in_a_generated_block_is_caught():
    for match in readme_tables.BLOCK.finditer(README):
        body = match.group("body")
        digit = re.search(r"\d", body)
        if not digit:
            continue
        changed = body[:digit.start()] + str((int(digit.group()) + 1) % 10) + body[digit.end():]
        edited = README[:match.start("body")] + changed + README[match.end("body"):]
        assert readme_tables.differing_blocks(edited) == [match.group("spec")]


def test_a_measured_number_without_a_file_is_caught_and_a_cited_one_is_not():
    prose = "\n\nIn one run the ViT reached 97.3% and trained at 812 images/s, 3.1x the naive way.\n"
    found = [number for _, number in readme_tables.unbacked_numbers(README + prose)]
    assert found == ["97.3%", "812 images/s", "3.1x"]
    cited = "\n\nResNet-9 reaches 94% on the official files (cifar10-fast).\n"
    assert readme_tables.unbacked_numbers(README + cited) == []
