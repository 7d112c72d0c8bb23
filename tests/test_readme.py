""" The README's front page works as written: its Python blocks run, its set-up commands are CI's, and every
relative link in README.md and docs/*.md points at an existing file and heading. CPU only, no network. """
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))

FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', re.M | re.S)
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ')'
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
INLINE_CODE = re.compile(r'(`+)(?:(?!\1).)+?\1', re.S)


def code_blocks(text, language):
    """ The contents of the fenced blocks of `language`, in order. """
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1).strip() == language]


def without_fences(text):
    """ The markdown with its fenced blocks blanked (their lines kept, so line numbers stay). """
    return FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def without_code(text):
    """ The markdown with fenced blocks and inline code spans blanked (links inside code are not links). """
    return INLINE_CODE.sub('', without_fences(text))


def slug(heading):
    """ GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped, spaces to '-'. """
    heading = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading: its text
    heading = re.sub(r'<[^>]+>', '', heading).strip().lower()
    heading = re.sub(r'[^\w\- ]', '', heading)
    return heading.replace(' ', '-')


def anchors(path):
    """ Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeated headings. """
    seen, result = {}, set()
    for line in without_fences(path.read_text(encoding='utf-8')).splitlines():
        m = re.match(r'^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$', line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f'{base}-{n}')
    return result


def test_slug_rule():
    assert slug('What holds RC-4 back') == 'what-holds-rc-4-back'
    assert slug('Which block: the evidence') == 'which-block-the-evidence'
    assert slug('Cost-adjustable steps (the extended version)') == 'cost-adjustable-steps-the-extended-version'
    assert slug('The wrapper: `timm_rc.unroll`') == 'the-wrapper-timm_rcunroll'


# ---------------------------------------------------------------- the README's Python blocks run

README_TEXT = README.read_text(encoding='utf-8')
PYTHON_BLOCKS = code_blocks(README_TEXT, 'python')


def _block_id(i, code):
    first = next((line.strip() for line in code.splitlines() if line.strip()), '')
    return f'block{i + 1}: {first[:40]}'


def test_readme_has_python_blocks():
    assert PYTHON_BLOCKS, 'README.md has no ```python block'


@pytest.mark.parametrize('index, code', list(enumerate(PYTHON_BLOCKS)),
                         ids=[_block_id(i, c) for i, c in enumerate(PYTHON_BLOCKS)])
def test_readme_python_block_runs(index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # a block must not need the network: it fails instead of hanging
    exec(compile(code, f'README.md block {index + 1}', 'exec'), {'__name__': '__readme__'})


# ---------------------------------------------------------------- the set-up commands are CI's

def ci_commands():
    lines = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
    return [line.strip() for line in lines if re.match(r'\s*python3? -m (pip|pytest)\b', line)]


def test_setup_commands_are_ci_commands():
    commands = ci_commands()
    assert any(' pip ' in c for c in commands) and any(' pytest' in c for c in commands), commands
    setup = README_TEXT.split('\n## Set-up\n', 1)
    assert len(setup) == 2, 'README.md has no "## Set-up" section'
    section = setup[1].split('\n## ', 1)[0]
    blocks = code_blocks(section, 'bash')
    assert blocks, 'no ```bash block under "## Set-up"'
    first = blocks[0].splitlines()
    for command in commands:
        assert command in first, f'.ci/run runs {command!r}; the README\'s Set-up block does not show it verbatim'


# ---------------------------------------------------------------- links point at files and headings

MARKDOWN_FILES = [README] + DOCS


def links(path):
    return [m.group(1) for m in LINK.finditer(without_code(path.read_text(encoding='utf-8')))]


def test_docs_exist():
    assert DOCS, 'docs/ has no .md page'


@pytest.mark.parametrize('page', MARKDOWN_FILES, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN_FILES])
def test_relative_links_resolve(page):
    problems = []
    for target in links(page):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I) or target.startswith('//'):
            continue  # https:, mailto:, ...
        file_part, _, anchor = target.partition('#')
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f'{target}: no file {dest}')
            continue
        if anchor:
            if dest.suffix.lower() != '.md' or dest.is_dir():
                problems.append(f'{target}: an anchor into a file that is not markdown')
            elif anchor not in anchors(dest):
                problems.append(f'{target}: {dest.relative_to(ROOT)} has no heading #{anchor}')
    assert not problems, f'{page.relative_to(ROOT)}:\n  ' + '\n  '.join(problems)


def test_readme_links_to_every_docs_page():
    linked = {(README.parent / t.partition('#')[0]).resolve() for t in links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f'README.md does not link docs pages {missing}'


def test_development_page_lists_every_test_file():
    text = (ROOT / 'docs' / 'development.md').read_text(encoding='utf-8')
    missing = [p.name for p in sorted((ROOT / 'tests').glob('*.py')) if p.name not in text]
    assert not missing, f'docs/development.md does not list {missing}'
