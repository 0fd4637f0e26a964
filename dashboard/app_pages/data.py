from dashboard.views import data

data.page()
