from dashboard.views import ensemble

ensemble.page()
