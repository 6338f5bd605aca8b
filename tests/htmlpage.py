"""A parsed HTML page for tests: find elements by id, attribute or tag, read their text."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list["Element | str"] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join("".join(c if isinstance(c, str) else f" {c.text} " for c in self.children).split())

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str | bool) -> list["Element"]:
        """Elements of `tag` (any, if None) whose attributes match: a string for a value (one of
        its classes, for class_), True for being there at all, False for not being there.
        Attribute names use '_' for '-' (data_tag: data-tag)."""
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}

        def matches(e: Element, k: str, v: str | bool) -> bool:
            if isinstance(v, bool):
                return (k in e.attrs) == v
            if k == "class":
                return v in e.attrs.get(k, "").split()
            return e.attrs.get(k) == v
        return [e for e in self.iter() if (tag is None or e.tag == tag) and all(
            matches(e, k, v) for k, v in wanted.items())]

    def find(self, tag: str | None = None, **attrs: str | bool) -> "Element":
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag or '*'}> with {attrs}"
        return found[0]

    def by_id(self, id_: str) -> "Element":
        return self.find(id=id_)


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        e = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(e)
        if tag not in VOID:
            self.stack.append(e)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Element:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root
