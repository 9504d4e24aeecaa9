"""The web page: static HTML/CSS/ES modules (``static/``) and the router that serves them at ``/``."""
