from dashboard.views import compare

compare.page()
