from dashboard.views import docs

docs.page()
