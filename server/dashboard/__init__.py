"""The operator dashboard's content: page models (data.py) and SVG charts (svg.py).

HTTP — the login, the cookie, the routes — is server.views.dashboard; this
package only reads services and renders, so it imports nothing from Flask but
its templates.
"""
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
