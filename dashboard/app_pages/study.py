from dashboard.views import study

study.page()
