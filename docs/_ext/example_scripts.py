"""``.. example-scripts:: ../examples/*.py``: each script as a section, docstring as text.

For every file matching the glob (sorted by name), the directive adds a section titled by the
script's docstring title, the rest of the docstring as reStructuredText, and the code after
the docstring through ``literalinclude`` (captioned with the script's path). The scripts are
not executed, so the build stays fast and offline. The title is a first line underlined by
``=``, ``-``, ``~`` ... (the sphinx-gallery convention), else the docstring's summary line,
else the file name. Titles inside the docstring become rubrics, so that scripts written in
different styles cannot break the page's heading levels.
"""

from __future__ import annotations

import ast
import glob
import os
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_id

_UNDERLINE = re.compile(r"^([=\-~^*+#])\1{2,}\s*$")


def split_script(source):
    """(title or None, docstring body, first code line number) of a script's source."""
    module = ast.parse(source)
    first = module.body[0] if module.body else None
    if not (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return None, "", 1
    lines = ast.get_docstring(module, clean=True).splitlines()
    title = None
    if len(lines) >= 2 and lines[0].strip() and _UNDERLINE.match(lines[1]):
        title, lines = lines[0].strip(), lines[2:]
    elif lines and _UNDERLINE.match(lines[0]) and len(lines) >= 3 and _UNDERLINE.match(lines[2]):
        title, lines = lines[1].strip(), lines[3:]
    elif lines and lines[0].strip():  # a summary line: the title, as in sphinx-gallery
        title, lines = lines[0].strip(), lines[1:]
    body = []
    for i, line in enumerate(lines):  # inner titles become rubrics
        if _UNDERLINE.match(line) and i > 0 and lines[i - 1].strip():
            body[-1] = f".. rubric:: {body[-1].strip()}"
            body.append("")
            continue
        body.append(line)
    code_start = first.end_lineno + 1
    code_lines = source.splitlines()
    while code_start <= len(code_lines) and not code_lines[code_start - 1].strip():
        code_start += 1
    return title, "\n".join(body).strip(), code_start


class ExampleScripts(SphinxDirective):
    """Render every script matching the argument (a glob relative to this document)."""

    required_arguments = 1
    has_content = False

    def run(self):
        pattern = self.argument
        here = os.path.dirname(self.env.doc2path(self.env.docname))
        paths = sorted(glob.glob(os.path.join(here, pattern)))
        self.env.note_dependency(os.path.join(here, os.path.dirname(pattern)))
        if not paths:
            para = nodes.paragraph(text=f"No example scripts found ({pattern}).")
            return [para]
        sections = []
        for path in paths:
            self.env.note_dependency(path)
            with open(path, encoding="utf-8") as file:
                source = file.read()
            name = os.path.basename(path)
            title, body, code_start = split_script(source)
            section = nodes.section(
                ids=[make_id(self.env, self.state.document, "example", os.path.splitext(name)[0])]
            )
            title_nodes, messages = self.state.inline_text(title or name, self.lineno)
            section += nodes.title(title or name, "", *title_nodes)
            section += messages
            rel = os.path.relpath(path, here).replace(os.sep, "/")
            repo_rel = os.path.relpath(path, os.path.dirname(here)).replace(os.sep, "/")
            text = [*body.splitlines(), ""]
            if code_start <= len(source.splitlines()):
                text += [
                    f".. literalinclude:: {rel}",
                    "   :language: python",
                    f"   :caption: {repo_rel}",
                    f"   :lines: {code_start}-",
                    "",
                ]
            self.state.nested_parse(StringList(text, source=path), self.content_offset, section)
            sections.append(section)
        return sections

    @property
    def argument(self):
        return self.arguments[0]


def setup(app):
    app.add_directive("example-scripts", ExampleScripts)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
