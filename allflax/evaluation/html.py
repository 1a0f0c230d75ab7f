"""Self-contained HTML pages: one style, tables, embedded PNGs. The report, compare and Monte Carlo
pages share them."""
import base64
import html

from allflax import files

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1160px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f5f5; }
table.facts td { text-align: left; } table.facts td:first-child { color: #555; }
img.plot { max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.row img.plot { max-width: 540px; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; padding: 0.4em; border: 3px solid #2e7d32; border-radius: 4px; }
figure.wrong { border-color: #c62828; }
figure img { display: block; height: 112px; }
figcaption { font-size: 0.85em; max-width: 360px; }
.note { color: #555; font-size: 0.9em; }
.warning { background: #fff4e0; border-left: 4px solid #e65100; padding: 0.4em 0.8em; }
"""


def embed_png(path: str, alt: str, css_class: str = 'plot') -> str:
    with open(path, 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
    return f'<img class="{css_class}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str] | None, rows: list[list]) -> str:
    """An HTML table; without a header, a two-column list of facts."""
    head = '' if header is None else '<tr>' + ''.join(f'<th>{html.escape(str(h))}</th>' for h in header) + '</tr>'
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(str(c))}</td>' for c in row) + '</tr>' for row in rows)
    return f'<table class="{"facts" if header is None else "values"}">{head}{body}</table>'


def number(value, digits: int = 4) -> str:
    return '–' if value is None else f'{value:.{digits}f}'


def interval(bounds) -> str:
    return '–' if bounds is None else f'[{bounds[0]:.4f}, {bounds[1]:.4f}]'


def _head(title: str) -> str:
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'


def page_titled(title: str):
    """Recognises a page that `write_page` wrote with `title`."""
    head = _head(title)

    def recognise(path: str) -> bool:
        try:
            with open(path, encoding='utf-8') as f:
                return f.read(len(head)) == head
        except (OSError, UnicodeDecodeError):
            return False
    return recognise


def write_page(path: str, title: str, body: str) -> str:
    page = (f'{_head(title)}<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>')
    with files.atomic_open(path) as f:
        f.write(page)
    return path
