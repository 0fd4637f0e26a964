from dashboard.views import lesson

lesson.page()
