from dashboard.views import about

about.page()
