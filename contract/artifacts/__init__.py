"""Exported files a phone receives: the manifest beside every model, and what makes one untrusted.

* `manifest` — the manifest beside every exported plan and app model, and its verification;
* `errors`   — `ArtifactError`: a file whose hash, layout or version cannot be trusted.
"""
