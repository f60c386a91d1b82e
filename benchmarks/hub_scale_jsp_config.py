# jupyterhub-singleuser's config in the scale benchmark: the shared servers, and only the
# server extensions a plain jupyter-server-proxy deployment has (this venv also has Panel's,
# a test dependency, which would add 1.7 s to every start).
import os

c = get_config()  # noqa: F821  (provided by the traitlets config loader)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_scale_servers.py")).read())  # noqa: S102
c.ServerApp.jpserver_extensions = {"panel.io.jupyter_server_extension": False}
