from dashboard.views import data, inputs

data.page(inputs.user_targets())
