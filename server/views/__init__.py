"""HTTP views, one blueprint per endpoint group; they only translate HTTP ↔ services."""
from server.views.artifacts import bp as artifacts_bp
from server.views.devices import bp as devices_bp
from server.views.meta import bp as meta_bp
from server.views.metrics import bp as metrics_bp
from server.views.dashboard import bp as dashboard_bp
from server.views.populations import bp as populations_bp
from server.views.secagg import bp as secagg_bp
from server.views.sessions import bp as sessions_bp

blueprints = (devices_bp, sessions_bp, secagg_bp, artifacts_bp, populations_bp, meta_bp, metrics_bp,
              dashboard_bp)
